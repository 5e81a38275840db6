import MicroVMCore
import Synchronization

/// The boot-time device at I/O port 0x440 (`GuestProtocol.bootTimerPort`): when the guest's
/// init writes `GuestProtocol.bootTimerValue` (123) there at boot complete, it records how long
/// after `start` (the VMM's process start) that happened — the boot time as Firecracker measures it.
///
/// ```swift
/// let timer = BootTimer(start: processStart) { elapsed in log.info("guest booted in \(elapsed)") }
/// try bus.insert(timer, at: UInt64(GuestProtocol.bootTimerPort), length: 1)
/// ```
public final class BootTimer: BusDevice {
    struct State {
        var bootTime: Duration?
        var signals = 0
        var ignored = 0
    }

    public let start: ContinuousClock.Instant
    private let now: @Sendable () -> ContinuousClock.Instant
    private let onBoot: (@Sendable (Duration) -> Void)?
    private let state = Mutex(State())

    /// - Parameters:
    ///   - start: the instant boot time is measured from.
    ///   - now: the clock (tests pass a fixed one).
    ///   - onBoot: called once, outside the device's lock, with the first boot time.
    public init(start: ContinuousClock.Instant,
                now: @escaping @Sendable () -> ContinuousClock.Instant = { ContinuousClock.now },
                onBoot: (@Sendable (Duration) -> Void)? = nil) {
        self.start = start
        self.now = now
        self.onBoot = onBoot
    }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        for i in 0..<data.count { data[i] = 0 }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        guard offset == 0, data.count == 1, data[0] == GuestProtocol.bootTimerValue else {
            state.withLock { $0.ignored += 1 }
            return
        }
        let t = now()
        let first = state.withLock { s -> Duration? in
            s.signals += 1
            guard s.bootTime == nil else { return nil }
            let elapsed = t - start
            s.bootTime = elapsed
            return elapsed
        }
        if let first { onBoot?(first) }
    }

    /// Time from `start` to the guest's first boot-complete signal, nil until it comes.
    public var bootTime: Duration? { state.withLock { $0.bootTime } }
    /// Boot-complete writes seen (more than one means the guest signalled again).
    public var signalCount: Int { state.withLock { $0.signals } }
    /// Writes of other values, sizes or offsets, which are ignored.
    public var ignoredCount: Int { state.withLock { $0.ignored } }
}
