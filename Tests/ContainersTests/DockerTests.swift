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

    @Test func emptyCommandIsRefused() async {
        await #expect(throws: MicroVMError.self) { try await self.box.backend(.docker).run(self.box.spec("dempty", [])) }
    }
}
