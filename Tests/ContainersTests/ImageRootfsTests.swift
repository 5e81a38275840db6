import Foundation
import Testing
import MicroVMCore
@testable import Containers

@Suite("Containers on the guest image's rootfs", .serialized, .timeLimit(.minutes(5)),
       .enabled(if: TestHost.canRunc && GuestImageTree.path != nil, "needs root, runc and a built guest image (mvm image build)"))
final class ImageRootfsTests {
    let box: Sandbox
    init() throws { box = try Sandbox() }

    @Test func benchmarkToolsRunInsideAndTheTreeStaysUntouched() async throws {
        let tree = try #require(GuestImageTree.path)
        let before = try FileManager.default.contentsOfDirectory(atPath: tree).sorted()
        let spec = VMSpec(name: "tools", command: ["sh", "-c", "sysbench --version && stress-ng --version && fio --version && iperf3 --version >/dev/null && echo tools-ok; touch /usr/x || echo ro"],
                          rootfs: tree, slice: ResourceSlice(cpus: 1, memory: .mebibytes(128), pidsLimit: 64), timeout: 60)
        let r = try await box.backend().run(spec)
        #expect(r.exitStatus == 0, "\(r.output)")
        #expect(r.output.contains("tools-ok") && r.output.contains("ro\n"), "\(r.output)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: tree).sorted() == before)
        #expect(box.leftovers(id: "mvm-tools").isEmpty)
    }

    @Test(.enabled(if: TestHost.v1Memory, "reads the cgroup v1 memory.oom_control")) func stressNGMemoryHogIsContained() async throws {
        let tree = try #require(GuestImageTree.path)
        let spec = VMSpec(name: "hog", command: ["sh", "-c", "stress-ng --vm 1 --vm-bytes 512M --vm-keep --oomable --temp-path /tmp --timeout 5s; echo oomkills=$(awk '/^oom_kill / {print $2}' /sys/fs/cgroup/memory/memory.oom_control)"],
                          rootfs: tree, slice: ResourceSlice(cpus: 1, memory: .mebibytes(64), pidsLimit: 64), timeout: 60)
        let r = try await box.backend().run(spec)
        // The hog's worker is OOM-killed at the limit (stress-ng --oomable carries on); the cgroup counted the kill.
        let kills = r.output.split(separator: "\n").first { $0.hasPrefix("oomkills=") }.flatMap { Int($0.dropFirst(9)) }
        #expect((kills ?? 0) > 0, "\(r.output)")
        #expect(r.output.contains("finished prematurely") || r.output.lowercased().contains("oom"), "\(r.output)")
        #expect(box.leftovers(id: "mvm-hog").isEmpty)
    }
}
