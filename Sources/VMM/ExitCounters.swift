import KVM
import Synchronization

/// One vCPU's exits to the VMM by kind and its time inside KVM_RUN, counted by its thread
/// without a lock and read for metrics.
public final class ExitCounters: Sendable {
    /// Kinds in the order metrics list them; `index(of:)` maps an exit to its counter.
    public static let kinds = ["io_in", "io_out", "mmio_read", "mmio_write", "halt", "shutdown", "system_event",
                               "internal_error", "fail_entry", "interrupted", "irq_window_open", "unknown"]
    // One atomic per kind (an array cannot hold atomics, which do not copy).
    private let c0 = Atomic<UInt64>(0), c1 = Atomic<UInt64>(0), c2 = Atomic<UInt64>(0), c3 = Atomic<UInt64>(0)
    private let c4 = Atomic<UInt64>(0), c5 = Atomic<UInt64>(0), c6 = Atomic<UInt64>(0), c7 = Atomic<UInt64>(0)
    private let c8 = Atomic<UInt64>(0), c9 = Atomic<UInt64>(0), c10 = Atomic<UInt64>(0), c11 = Atomic<UInt64>(0)
    /// Nanoseconds inside KVM_RUN (running the guest, or halted in the kernel).
    let guestNanoseconds = Atomic<UInt64>(0)

    public init() {}

    static func index(of exit: VCPUExit) -> Int {
        switch exit {
        case .portIn: 0
        case .portOut: 1
        case .mmioRead: 2
        case .mmioWrite: 3
        case .halt: 4
        case .shutdown: 5
        case .systemEvent: 6
        case .internalError: 7
        case .failEntry: 8
        case .interrupted: 9
        case .irqWindowOpen: 10
        case .unknown: 11
        }
    }

    private func counter<R>(_ i: Int, _ body: (borrowing Atomic<UInt64>) -> R) -> R {
        switch i {
        case 0: body(c0)
        case 1: body(c1)
        case 2: body(c2)
        case 3: body(c3)
        case 4: body(c4)
        case 5: body(c5)
        case 6: body(c6)
        case 7: body(c7)
        case 8: body(c8)
        case 9: body(c9)
        case 10: body(c10)
        default: body(c11)
        }
    }

    func count(_ exit: VCPUExit, inGuestFor nanoseconds: UInt64) {
        counter(Self.index(of: exit)) { _ = $0.add(1, ordering: .relaxed) }
        guestNanoseconds.add(nanoseconds, ordering: .relaxed)
    }

    /// Kind → count, every kind present.
    public var snapshot: [(kind: String, count: UInt64)] {
        Self.kinds.indices.map { i in (Self.kinds[i], counter(i) { $0.load(ordering: .relaxed) }) }
    }
}

extension VirtualMachine {
    /// Exits to the VMM so far, by kind, over all vCPUs.
    public var exitCounts: [(kind: String, count: UInt64)] {
        let each = exitCounters.map(\.snapshot)
        return ExitCounters.kinds.indices.map { i in (ExitCounters.kinds[i], each.reduce(0) { $0 + $1[i].count }) }
    }

    /// Seconds all vCPUs spent inside KVM_RUN.
    public var guestSeconds: Double {
        Double(exitCounters.reduce(0) { $0 + $1.guestNanoseconds.load(ordering: .relaxed) }) / 1e9
    }
}
