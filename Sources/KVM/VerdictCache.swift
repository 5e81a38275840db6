import FoundationEssentials
import MicroVMCore

/// The KVM verdict, measured once per boot and kept in the state directory, keyed by the boot's
/// id: every binary of the project (`mvm`, `mvm-vmm`, tests, debug or release) shares it, so
/// none of them probes again on its launch path.
public enum KVMVerdictCache {
    /// What the cached verdict was measured by; bump the revision when the probe's logic
    /// changes what it concludes.
    static let proberIdentity = "kvm-functional-probe r1"

    private struct Entry: Encodable {
        var bootID: String
        var prober: String?
        var result: KVMProbeResult

        init(bootID: String, prober: String?, result: KVMProbeResult) { self.bootID = bootID; self.prober = prober; self.result = result }

        /// Read without Codable, whose first use costs a VMM's start about a millisecond.
        init(parsing bytes: [UInt8]) throws(JSONFieldError) {
            let f = try JSONFields(parsing: bytes)
            bootID = try f.required("bootID", f.string)
            prober = try f.string("prober")
            result = try f.required("result") { (k) throws(JSONFieldError) in try f.object(k, as: KVMProbeResult.self) }
        }
    }

    /// This boot's id (the kernel's random boot_id under `proc`): what per-boot caches are keyed by.
    public static func bootID(proc: String = "/proc") -> String {
        readWholeText(proc + "/sys/kernel/random/boot_id")?.trimmed() ?? "unknown"
    }

    /// The verdict of this boot: the cached one, else a fresh probe (`KVMFunctionalProbe`), which
    /// is then cached. `refresh` probes again whatever the cache says.
    public static func verdict(paths: Paths = .default, bootID: String = bootID(), refresh: Bool = false) -> KVMProbeResult {
        let file = paths.hostProfile
        if !refresh, bootID != "unknown", let d = readWholeFile(file),
           let c = try? Entry(parsing: d), c.bootID == bootID, c.prober == proberIdentity {
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
