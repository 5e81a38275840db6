import FoundationEssentials
import MicroVMCore

/// The KVM verdict, measured once per boot and kept in the state directory, keyed by the boot's
/// id: every binary of the project (`mvm`, `mvm-vmm`, tests, debug or release) shares it, so
/// none of them probes again on its launch path.
public enum KVMVerdictCache {
    /// What the cached verdict was measured by; bump the revision when the probe's logic
    /// changes what it concludes.
    static let proberIdentity = "kvm-functional-probe r1"

    private struct Entry: Codable { var bootID: String; var prober: String?; var result: KVMProbeResult }

    /// This boot's id (the kernel's random boot_id under `proc`): what per-boot caches are keyed by.
    public static func bootID(proc: String = "/proc") -> String {
        FileManager.default.contents(atPath: proc + "/sys/kernel/random/boot_id").map { String(decoding: $0, as: UTF8.self).trimmed() } ?? "unknown"
    }

    /// The verdict of this boot: the cached one, else a fresh probe (`KVMFunctionalProbe`), which
    /// is then cached. `refresh` probes again whatever the cache says.
    public static func verdict(paths: Paths = .default, bootID: String = bootID(), refresh: Bool = false) -> KVMProbeResult {
        let file = paths.hostProfile
        if !refresh, bootID != "unknown", let d = FileManager.default.contents(atPath: file),
           let c = try? JSONDecoder().decode(Entry.self, from: d), c.bootID == bootID, c.prober == proberIdentity {
            return c.result
        }
        let r = KVMFunctionalProbe.run()
        if let d = try? JSONEncoder().encode(Entry(bootID: bootID, prober: proberIdentity, result: r)) {
            try? Paths.ensureDirectory(paths.state)
            _ = FileManager.default.createFile(atPath: file, contents: d)
        }
        return r
    }
}
