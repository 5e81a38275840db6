import Foundation
import KVM
import MicroVMCore
import Testing

struct VerdictCacheTests {
    func scratch() throws -> Paths {
        let dir = NSTemporaryDirectory() + "verdict-\(getpid())-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return Paths(state: dir, cache: dir)
    }

    /// This boot's cached verdict is what every binary gets, without probing; another boot's,
    /// another prober's or a damaged file is not used.
    @Test func theCachedVerdictOfThisBootIsRead() throws {
        let paths = try scratch()
        defer { try? FileManager.default.removeItem(atPath: paths.state) }
        let boot = KVMVerdictCache.bootID()
        #expect(boot != "unknown" && boot.count == 36, "boot_id: \(boot)")
        func write(_ text: String) throws { try Data(text.utf8).write(to: URL(fileURLWithPath: paths.hostProfile)) }
        try write(#"{"prober": "kvm-functional-probe r1", "bootID": "\#(boot)", "result": {"verdict": "hardware", "reason": "written by the test \u00e9", "apiVersion": 12, "cpl0NanosecondsPerIteration": 1.5, "cmpxchg16bWorks": true}}"#)
        let cached = KVMVerdictCache.verdict(paths: paths)
        #expect(cached == KVMProbeResult(verdict: .hardware, reason: "written by the test \u{e9}", apiVersion: 12, cpl0NanosecondsPerIteration: 1.5, cmpxchg16bWorks: true))
        // What the cache writes, it reads back: a fresh probe, then the file it left.
        let probed = KVMVerdictCache.verdict(paths: paths, refresh: true)
        #expect(probed.reason != cached.reason)
        #expect(KVMVerdictCache.verdict(paths: paths) == probed)
        // Another boot's entry is probed again (and replaced).
        try write(#"{"prober": "kvm-functional-probe r1", "bootID": "another-boot", "result": {"verdict": "hardware", "reason": "stale"}}"#)
        #expect(KVMVerdictCache.verdict(paths: paths).reason != "stale")
    }
}
