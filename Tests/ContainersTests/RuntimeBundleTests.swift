import Foundation
import Testing
import MicroVMCore
import ConfigFile
import Allocator
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

    /// `update --resources` reads the same fields: what is set is the change, what is unset or
    /// zero is not; a field of the wrong type is named.
    @Test func updateResourcesAreAChangeOfTheSetFieldsOnly() throws {
        let r = try RuntimeBundle.resources(from: Data(#"{"cpu": {"shares": 512, "quota": 0}, "memory": {"limit": 134217728}}"#.utf8), named: "stdin")
        let (c, pids) = try RuntimeBundle.change(r, hostMemory: .gibibytes(8), hostCPUs: 4)
        #expect(c == Allocator.Resize(memory: .mebibytes(128), weight: 50) && pids == nil)
        let empty = try RuntimeBundle.change(try RuntimeBundle.resources(from: Data("{}".utf8), named: "stdin"), hostMemory: .gibibytes(8), hostCPUs: 4)
        #expect(empty.resize.isEmpty)
        let e = try #require(throws: MicroVMError.self) { try RuntimeBundle.resources(from: Data(#"{"memory": {"limit": "1G"}}"#.utf8), named: "stdin") }
        #expect(e.message.contains("stdin: memory.limit must be an integer"), "\(e.message)")
        #expect(throws: MicroVMError.self) { try RuntimeBundle.change(RuntimeBundle.resources(from: Data(#"{"cpu": {"quota": 900000}}"#.utf8), named: "stdin"), hostMemory: .gibibytes(8), hostCPUs: 4) }
    }

    @Test func theSpecHasABalloonSoMemoryGoesBackAndCanBeResized() throws {
        let (b, dir) = try bundle(resources: "{}")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let spec = try b.spec(name: "x", config: try MicroVMConfig.load(), host: try HostCapacity.probe(), disk: dir + "/disk")
        #expect(spec.balloon?.freePageReporting == true && spec.balloon?.amount == ByteCount(0))
    }
}
