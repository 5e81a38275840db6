import Foundation
import Testing
import MicroVMCore
@testable import Containers

/// A bundle's config.json as mvm-runtime reads it: its slice from `linux.resources`, with a
/// hostile value clamped rather than trapping.
@Suite struct RuntimeBundleTests {
    func bundle(resources: String) throws -> (RuntimeBundle, String) {
        let dir = NSTemporaryDirectory() + "mvm-bundle-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir + "/rootfs", withIntermediateDirectories: true)
        try #"{"process": {"args": ["true"], "env": ["PATH=/bin"], "cwd": "/srv"}, "root": {"path": "rootfs"}, "linux": {"resources": \#(resources)}}"#
            .write(toFile: dir + "/config.json", atomically: true, encoding: .utf8)
        return (try RuntimeBundle(directory: dir), dir)
    }

    @Test func resourcesBecomeTheSliceAndTheSpec() throws {
        let (b, dir) = try bundle(resources: #"{"memory": {"limit": 536870912}, "cpu": {"quota": 150000, "period": 100000, "shares": 2048}, "pids": {"limit": 64}}"#)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let s = try b.slice(defaults: ResourceSlice(cpus: 1, memory: .mebibytes(256)), hostMemory: .gibibytes(8), hostCPUs: 4)
        #expect(s.memory == .mebibytes(512) && s.cpus == 2 && s.cpuQuota == 1.5 && s.cpuWeight == 200 && s.pidsLimit == 64)
        #expect(b.env == ["PATH=/bin"] && b.cwd == "/srv" && b.rootfs == dir + "/rootfs")
    }

    @Test func hugeSharesAreClampedNotATrap() throws {
        let (b, dir) = try bundle(resources: #"{"cpu": {"shares": 18446744073709551615}}"#)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let s = try b.slice(defaults: ResourceSlice(cpus: 1, memory: .mebibytes(256)), hostMemory: .gibibytes(8), hostCPUs: 4)
        #expect(s.cpuWeight == 10_000)
    }
}
