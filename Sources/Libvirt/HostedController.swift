import Foundation
import Synchronization
import CLibvirt
import MicroVMCore
import VMMAPI

/// A hosted VM behind the same control API as the direct VMM: the `mvm run` that holds the
/// domain (for the embedded driver, the only process that can reach it) serves it on the run's
/// `api.sock`, so `mvm update` and `mvm stats` in another process talk to QEMU through libvirt
/// as they talk to `mvm-vmm`. The balloon is libvirt's (`virDomainSetMemoryFlags`,
/// `virDomainMemoryStats`); the machine is already running, so the pre-boot calls are refused.
final class HostedController: VMMController, Sendable {
    let domain: LibvirtDomain
    /// The memory the guest booted with; the balloon holds what it no longer has.
    let boot: ByteCount
    private let target: Mutex<UInt32>
    let hasBalloon: Bool

    init(domain: LibvirtDomain, boot: ByteCount, balloon: ByteCount?) {
        self.domain = domain; self.boot = boot; hasBalloon = balloon != nil
        target = Mutex(UInt32((balloon?.bytes ?? 0) / 4096))
    }

    var state: InstanceState { domain.state() == .paused ? .paused : .running }

    func start(_ config: VMConfiguration) throws {
        throw MicroVMError.invalidArgument("the hosted VM was started by its mvm run")
    }
    func pause() throws { throw MicroVMError.unsupported("pause a hosted VM with mvm pause") }
    func resume() throws { throw MicroVMError.unsupported("resume a hosted VM with mvm resume") }
    func sendCtrlAltDel() throws { throw MicroVMError.unsupported("stop a hosted VM with mvm stop") }

    func setBalloon(amountMib: Int) throws {
        guard hasBalloon else { throw NoBalloonDevice() }
        let amount = ByteCount.mebibytes(UInt64(max(0, amountMib)))
        guard amount < boot else { throw MicroVMError.invalidArgument("a balloon of \(amount) must be smaller than the guest's \(boot)") }
        try domain.setLiveMemory(boot - amount)
        target.withLock { $0 = UInt32(amount.bytes / 4096) }
    }

    /// libvirt's tags, in KiB or counts, as the API's names (sizes in bytes, as the direct VMM's).
    static let statNames: [(tag: Int32, name: String, kib: Bool)] = [
        (Int32(VIR_DOMAIN_MEMORY_STAT_SWAP_IN.rawValue), "swap_in", true), (Int32(VIR_DOMAIN_MEMORY_STAT_SWAP_OUT.rawValue), "swap_out", true),
        (Int32(VIR_DOMAIN_MEMORY_STAT_MAJOR_FAULT.rawValue), "major_faults", false), (Int32(VIR_DOMAIN_MEMORY_STAT_MINOR_FAULT.rawValue), "minor_faults", false),
        (Int32(VIR_DOMAIN_MEMORY_STAT_UNUSED.rawValue), "free_memory", true), (Int32(VIR_DOMAIN_MEMORY_STAT_AVAILABLE.rawValue), "total_memory", true),
        (Int32(VIR_DOMAIN_MEMORY_STAT_USABLE.rawValue), "available_memory", true), (Int32(VIR_DOMAIN_MEMORY_STAT_DISK_CACHES.rawValue), "disk_caches", true),
        (Int32(VIR_DOMAIN_MEMORY_STAT_HUGETLB_PGALLOC.rawValue), "hugetlb_allocations", false),
        (Int32(VIR_DOMAIN_MEMORY_STAT_HUGETLB_PGFAIL.rawValue), "hugetlb_failures", false),
    ]

    func balloonStatistics() throws -> BalloonStatistics {
        guard hasBalloon else { throw NoBalloonDevice() }
        let stats = domain.memoryStatistics()
        // ACTUAL_BALLOON is the memory the guest has now: the balloon holds the rest.
        let current = stats[Int32(VIR_DOMAIN_MEMORY_STAT_ACTUAL_BALLOON.rawValue)].map { ByteCount.kibibytes($0) } ?? boot
        var guest: [String: UInt64] = [:]
        for s in Self.statNames { if let v = stats[s.tag] { guest[s.name] = s.kib ? v * 1024 : v } }
        return BalloonStatistics(targetPages: target.withLock { $0 }, actualPages: UInt32((boot - current).bytes / 4096), guest: guest)
    }

    func metricsText() -> String {
        let info = try? domain.info()
        var lines = ["# TYPE mvm_hosted_memory_bytes gauge", "mvm_hosted_memory_bytes \(info?.memory.bytes ?? 0)",
                     "# TYPE mvm_hosted_cpu_seconds_total counter", "mvm_hosted_cpu_seconds_total \(Double(info?.cpuTime ?? 0) / 1e9)"]
        if hasBalloon, let b = try? balloonStatistics() {
            lines += ["# TYPE mvm_hosted_balloon_target_bytes gauge", "mvm_hosted_balloon_target_bytes \(UInt64(b.targetPages) * 4096)",
                      "# TYPE mvm_hosted_balloon_actual_bytes gauge", "mvm_hosted_balloon_actual_bytes \(UInt64(b.actualPages) * 4096)"]
        }
        return lines.joined(separator: "\n") + "\n"
    }
}
