import Foundation
import Testing
import MicroVMCore
@testable import Containers

@Suite("Containers under Docker", .serialized, .timeLimit(.minutes(5)),
       .enabled(if: TestHost.dockerRunning, "dockerd is not running: start it with 'dockerd --iptables=false --bridge=none &'"))
final class DockerTests {
    let box: Sandbox
    init() throws { box = try Sandbox() }

    @Test func sameCommandSameSlice() async throws {
        let slice = ResourceSlice(cpus: 1, placement: .pinned, cpuSet: [0], cpuWeight: 50, cpuQuota: 0.5,
                                  memory: .mebibytes(96), pidsLimit: 40)
        let backend = box.backend(.docker)
        let r = try await backend.run(box.spec("dhello", ["sh", "-c", "echo hello; exit 3"], slice: slice))
        #expect(r.exitStatus == 3)
        #expect(r.output == "hello\n")
        #expect(r.bootSeconds != nil)
        if TestHost.v1Memory {
            let files = ["cpuset/cpuset.cpus", "memory/memory.limit_in_bytes", "pids/pids.max", "cpu/cpu.shares", "cpu/cpu.cfs_quota_us"]
            let script = files.map { "echo \($0)=$(cat /sys/fs/cgroup/\($0))" }.joined(separator: "; ")
            let c = try await backend.run(box.spec("dslice", ["sh", "-c", script], slice: slice))
            for line in ["cpuset/cpuset.cpus=0", "memory/memory.limit_in_bytes=100663296", "pids/pids.max=40",
                         "cpu/cpu.shares=512", "cpu/cpu.cfs_quota_us=50000"] {
                #expect(c.output.contains(line + "\n"), "expected \(line) in \(c.output)")
            }
        }
        // --rm and the reaper leave no container behind.
        let ps = try ProcessRunner.run(["docker", "ps", "-a", "--filter", "name=mvm-dhello", "-q"]).stdoutText
        #expect(ps.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty)
    }

    /// With a network the container joins the mvm bridge and reaches the host at its gateway; its
    /// disk is a host directory at /mnt, written through.
    @Test func bridgeNetworkAndDirectoryDisk() async throws {
        let dir = NSTemporaryDirectory() + "mvm-docker-disk-\(UUID().uuidString.prefix(6))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var spec = box.spec("dnet", ["sh", "-c", "ping -c 1 -W 3 \(ContainerBackend.dockerNetworkHost) >/dev/null && echo ping-ok; echo written > /mnt/f"])
        spec.net = NetSpec()
        spec.disks = [DiskSpec(path: dir)]
        let r = try await box.backend(.docker).run(spec)
        #expect(r.exitStatus == 0, "\(r.output)")
        #expect(r.output.contains("ping-ok"), "\(r.output)")
        #expect((try? String(contentsOfFile: dir + "/f", encoding: .utf8)) == "written\n")
        var bad = box.spec("dbad", ["true"])
        bad.net = NetSpec(tap: "x")
        await #expect(throws: MicroVMError.self) { try await self.box.backend(.docker).run(bad) }
    }

    @Test func emptyCommandIsRefused() async {
        await #expect(throws: MicroVMError.self) { try await self.box.backend(.docker).run(self.box.spec("dempty", [])) }
    }
}
