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
    /// The vCPU slots the machine has; `setVCPUs` fills or empties them (CPU hotplug).
    let maxVCPUs: Int
    /// QEMU's process, when it runs on this host: what it really runs is read there.
    let qemuPid: Int32?

    init(domain: LibvirtDomain, boot: ByteCount, balloon: ByteCount?, maxVCPUs: Int, qemuPid: Int32?) {
        self.domain = domain; self.boot = boot; hasBalloon = balloon != nil; self.qemuPid = qemuPid
        self.maxVCPUs = maxVCPUs
        target = Mutex(UInt32((balloon?.bytes ?? 0) / 4096))
    }

    var state: InstanceState { domain.state() == .paused ? .paused : .running }

    func start(_ config: VMConfiguration) throws {
        throw MicroVMError.invalidArgument("the hosted VM was started by its mvm run")
    }
    func pause() throws { throw MicroVMError.unsupported("pause a hosted VM with mvm pause") }
    func resume() throws { throw MicroVMError.unsupported("resume a hosted VM with mvm resume") }
    func sendCtrlAltDel() throws { throw MicroVMError.unsupported("stop a hosted VM with mvm stop") }

    /// Plugs vCPUs in or out (libvirt's live `setVcpus`): the guest's init brings new ones online;
    /// one taken out is offlined by the guest's kernel when QEMU asks it to eject the CPU. What
    /// counts is what QEMU runs (its "CPU N/…" threads), checked after every change.
    func setVCPUs(_ count: Int) throws {
        guard (1...maxVCPUs).contains(count) else {
            throw MicroVMError.invalidArgument(maxVCPUs == 1 || count < 1
                ? "the VM has room for \(maxVCPUs) vCPU\(maxVCPUs == 1 ? "" : "s") (mvm run --max-cpus gives it more): \(count) cannot be set"
                : "\(count) vCPUs is more than the \(maxVCPUs) the VM has room for (mvm run --max-cpus)")
        }
        if let running = runningVCPUs(), let counted = try? domain.info().vcpus, running != counted {
            throw Self.lostTrack(running: running, counted: counted)
        }
        do {
            try domain.setLiveVCPUs(count)
        } catch let e as MicroVMError where e.code == .timeout {
            // libvirt waits 5 s for QEMU to say the guest ejected the vCPU. Under TCG, QEMU 7.2
            // never says it (only the vCPU's lapic gets a DEVICE_DELETED), though the eject is
            // done; a slow guest may also just take longer. QEMU's threads tell.
            if waitFor(count, seconds: Self.unplugWait) { return }
            throw MicroVMError(.timeout, "the guest did not let go of its vCPUs within \(Int(Self.unplugWait + 5)) s (QEMU runs \(runningVCPUs().map(String.init) ?? "an unknown number of") now): is its kernel able to offline CPUs?")
        }
        guard waitFor(count, seconds: 10) else {
            let running = runningVCPUs() ?? 0
            throw running != count && (try? domain.info().vcpus) == count
                ? Self.lostTrack(running: running, counted: count)
                : MicroVMError(.backend, "libvirt set \(count) vCPUs but QEMU runs \(running)")
        }
    }

    /// How long an unplug the guest is slow to finish is waited for, after libvirt's own 5 s.
    static let unplugWait: Double = 55

    /// When libvirt never heard of a finished unplug (above), it counts the vCPU as present and
    /// will neither plug nor unplug that slot again.
    static func lostTrack(running: Int, counted: Int) -> MicroVMError {
        MicroVMError(.backend, "QEMU runs \(running) vCPU\(running == 1 ? "" : "s") but libvirt counts \(counted): libvirt never heard that a vCPU's unplug finished (QEMU under TCG does not say), and will not plug that slot again; mvm stop the VM and run it again to change its vCPUs")
    }

    /// The vCPU threads QEMU runs; nil when QEMU is not local.
    func runningVCPUs() -> Int? {
        qemuPid.map { pid in HostedBackend.qemuThreads(of: pid).filter { $0.vcpu != nil }.count }
    }

    /// Whether QEMU (or, without its pid, libvirt) runs `count` vCPUs within `seconds`.
    func waitFor(_ count: Int, seconds: Double) -> Bool {
        let deadline = Monotonic.seconds() + seconds
        while true {
            if let now = runningVCPUs() ?? (try? domain.info().vcpus), now == count { return true }
            if Monotonic.seconds() >= deadline { return false }
            usleep(100_000)
        }
    }

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
        // The figures are the guest's (its balloon driver's statistics): sizes saturate.
        for s in Self.statNames { if let v = stats[s.tag] { guest[s.name] = s.kib ? ByteCount.kibibytes(v).bytes : v } }
        return BalloonStatistics(targetPages: target.withLock { $0 }, actualPages: UInt32(clamping: (boot - current).bytes / 4096), guest: guest)
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
