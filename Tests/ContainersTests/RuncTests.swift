import Foundation
import Testing
import MicroVMCore
import Host
@testable import Containers

@Suite("Containers under runc", .serialized, .timeLimit(.minutes(5)),
       .enabled(if: TestHost.canRunc, "needs root, runc (apt-get install runc) and busybox-static"))
final class RuncTests {
    let box: Sandbox
    init() throws { box = try Sandbox() }

    @Test func outputAndExitStatus() async throws {
        let r = try await box.backend().run(box.spec("hello", ["sh", "-c", "echo hello; echo oops >&2; exit 3"]))
        #expect(r.exitStatus == 3)
        #expect(r.output == "hello\noops\n")
        let boot = try #require(r.bootSeconds)
        #expect(boot > 0 && boot <= r.totalSeconds)
        #expect(r.console.contains("hello"))
        #expect(box.leftovers(id: "mvm-hello").isEmpty, "\(box.leftovers(id: "mvm-hello"))")
        // The log outlives the run, for mvm logs.
        #expect(try await box.backend().logs(name: "hello").contains("hello"))
    }

    @Test(.enabled(if: TestHost.v1Memory, "reads cgroup v1 files"))
    func sliceIsAppliedToTheCgroups() async throws {
        let slice = ResourceSlice(cpus: 1, placement: .pinned, cpuSet: [0], cpuWeight: 50, cpuQuota: 0.5,
                                  memory: .mebibytes(96), pidsLimit: 40)
        let files = ["cpuset/cpuset.cpus", "memory/memory.limit_in_bytes", "memory/memory.memsw.limit_in_bytes",
                     "pids/pids.max", "cpu/cpu.shares", "cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us"]
        let script = files.map { "echo \($0)=$(cat /sys/fs/cgroup/\($0))" }.joined(separator: "; ")
        let r = try await box.backend().run(box.spec("slice", ["sh", "-c", script], slice: slice))
        #expect(r.exitStatus == 0, "\(r.output)")
        for line in ["cpuset/cpuset.cpus=0", "memory/memory.limit_in_bytes=100663296", "memory/memory.memsw.limit_in_bytes=100663296",
                     "pids/pids.max=40", "cpu/cpu.shares=512", "cpu/cpu.cfs_quota_us=50000", "cpu/cpu.cfs_period_us=100000"] {
            #expect(r.output.contains(line + "\n"), "expected \(line) in \(r.output)")
        }
    }

    @Test func confinement() async throws {
        let script = """
            grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status
            touch /rootfile 2>/dev/null && echo root-writable || echo root-readonly
            touch /tmp/x && echo tmp-writable
            swapoff -a 2>/dev/null; echo swapoff=$?
            hostname
            """
        let r = try await box.backend().run(box.spec("confined", ["sh", "-c", script]))
        #expect(r.output.contains("Seccomp:\t2"), "\(r.output)")
        #expect(r.output.contains("NoNewPrivs:\t1"))
        #expect(r.output.contains("root-readonly"))
        #expect(r.output.contains("tmp-writable"))
        #expect(!r.output.contains("swapoff=0"))
        #expect(r.output.contains("confined\n"))
        #expect(!FileManager.default.fileExists(atPath: box.rootfs + "/rootfile"))
    }

    @Test(.enabled(if: TestHost.v1Memory, "reads cgroup v1 memory files"))
    func memoryBombIsKilledAndTheNeighbourSurvives() async throws {
        let backend = box.backend()
        let bomb = box.spec("bomb", ["tail", "/dev/zero"], slice: ResourceSlice(cpus: 1, memory: .mebibytes(64), pidsLimit: 64))
        let calm = box.spec("neighbour", ["sh", "-c", "sleep 2; echo alive"], slice: ResourceSlice(cpus: 1, memory: .mebibytes(64)))
        async let a = backend.run(bomb)
        async let b = backend.run(calm)
        let (ra, rb) = try await (a, b)
        #expect(ra.exitStatus == 137, "the bomb should die of SIGKILL from the OOM killer: \(ra.exitStatus) \(ra.output)")
        #expect(rb.exitStatus == 0)
        #expect(rb.output == "alive\n")
        #expect(box.leftovers(id: "mvm-bomb").isEmpty)
    }

    @Test func forkBombIsStoppedByThePidsLimit() async throws {
        let slice = ResourceSlice(cpus: 1, memory: .mebibytes(128), pidsLimit: 24)
        let r = try await box.backend().run(box.spec("forkbomb", ["sh", "-c", "while true; do sleep 1000 & done"], slice: slice, timeout: 60))
        #expect(r.exitStatus != 0)
        #expect(r.output.lowercased().contains("fork"), "\(r.output)")
        #expect(box.leftovers(id: "mvm-forkbomb").isEmpty)
        // The pid namespace died with its init, so none of the sleeps survive on the host.
        let ps = try ProcessRunner.run(["sh", "-c", "ps -eo args | grep -c '^sleep 1000$' || true"]).stdoutText
        #expect(ps.trimmingCharacters(in: .whitespacesAndNewlines) == "0")
    }

    @Test func malformedRequestsGiveOneClearError() async throws {
        let b = box.backend()
        await #expect(throws: MicroVMError.self) { try await b.run(VMSpec(name: "x", command: ["true"], rootfs: "/nonexistent/rootfs")) }
        await #expect(throws: MicroVMError.self) { try await b.run(box.spec("empty", [])) }
        do {
            _ = try await ContainerBackend(runtime: "/nonexistent/runc", paths: box.paths).run(box.spec("noruntime", ["true"]))
            Issue.record("a missing runtime must throw")
        } catch let e as MicroVMError {
            #expect(e.code == .notFound)
            #expect(e.message.contains("/nonexistent/runc") && e.message.contains("apt-get install runc"))
        }
        // A command missing from the rootfs fails the way a shell reports it, as in a VM.
        let missing = try await b.run(box.spec("missingcmd", ["/no/such/binary"]))
        #expect(missing.exitStatus == 127)
        #expect(missing.output.contains("not found"), "\(missing.output)")
        #expect(box.leftovers(id: "mvm-missingcmd").isEmpty)
    }

    @Test(.enabled(if: TestHost.hybridCgroups, "only a hybrid cgroup host makes crun refuse"))
    func crunOnHybridCgroupsNamesTheFix() async throws {
        do {
            _ = try await box.backend(.crun).run(box.spec("crun", ["true"]))
            Issue.record("crun on hybrid cgroups must throw")
        } catch let e as MicroVMError {
            #expect(e.code == .unsupported)
            #expect(e.message.contains("hybrid") && e.message.contains("runc"), "\(e.message)")
        }
        // Automatic selection falls back to runc here.
        let r = try await box.backend(.automatic).run(box.spec("auto", ["echo", "ok"]))
        #expect(r.output == "ok\n")
    }

    @Test func timeoutKillsAndCleansUp() async throws {
        do {
            _ = try await box.backend().run(box.spec("slow", ["sleep", "30"], timeout: 1))
            Issue.record("a run past its timeout must throw")
        } catch let e as MicroVMError {
            #expect(e.code == .timeout)
        }
        #expect(box.leftovers(id: "mvm-slow").isEmpty, "\(box.leftovers(id: "mvm-slow"))")
    }

    @Test func reaperRemovesContainersOfADeadOwner() async throws {
        // A container left by an mvm that was killed: created, never started, owner long gone.
        let store = ContainerStore(paths: box.paths)
        let id = "mvm-orphan"
        var owner = OwnerRecord.current(name: "orphan", runtime: try #require(ProcessRunner.which("runc")), cpus: 1, memory: .mebibytes(64))
        owner.pid = Int32.max - 1
        let bundle = try store.createBundle(id: id, owner: owner)
        let config = try OCISpec.make(ContainerOptions(rootfs: box.rootfs, command: ["sleep", "100"], hostname: "orphan",
                                                       cgroupsPath: "/microvm/\(store.cgroupLeaf(id))", enforcement: Enforcement(slice: ResourceSlice(cpus: 1, memory: .mebibytes(64)), mode: .container)))
        try config.encoded().write(to: URL(fileURLWithPath: bundle + "/config.json"))
        // The created container keeps its stdio, so it gets /dev/null rather than our pipes.
        try ProcessRunner.check(["sh", "-c", "exec runc --root \"$1\" create --bundle \"$2\" \"$3\" </dev/null >/dev/null 2>&1",
                                 "sh", store.runtimeRoot, bundle, id], timeout: 30)
        #expect(!CgroupDirs.candidates(id: store.cgroupLeaf(id)).isEmpty)
        let listed = try await box.backend().list()
        #expect(!listed.contains { $0.name == "orphan" })
        #expect(box.leftovers(id: id).isEmpty, "\(box.leftovers(id: id))")
    }

    @Test func listStopAndLogsOfARunningContainer() async throws {
        let backend = box.backend()
        let spec = box.spec("sleeper", ["sh", "-c", "echo started; exec sleep 30"])
        let running = Task { try await backend.run(spec) }
        var seen = false
        for _ in 0..<100 where !seen {
            try await Task.sleep(for: .milliseconds(100))
            seen = try await backend.list().contains { $0.name == "sleeper" && $0.state == "running" }
        }
        #expect(seen)
        #expect(try await backend.logs(name: "sleeper").contains("started"))
        try await backend.stop(name: "sleeper")
        let r = try await running.value
        #expect(r.exitStatus == 143 || r.exitStatus == 137)
        #expect(try await backend.list().isEmpty)
        #expect(box.leftovers(id: "mvm-sleeper").isEmpty)
        await #expect(throws: MicroVMError.self) { try await backend.stop(name: "sleeper") }
    }

    @Test(.enabled(if: ProcessRunner.which("ip") != nil, "needs iproute2"))
    func networkLinkToTheHost() async throws {
        let r = try await box.backend().run(VMSpec(name: "net", net: NetSpec(hostAddress: "10.200.250.1", guestAddress: "10.200.250.2"),
                                                    command: ["sh", "-c", "ip -4 -o addr show eth0; ping -c 1 -W 3 10.200.250.1 >/dev/null && echo ping-ok"],
                                                    rootfs: box.rootfs, timeout: 60))
        #expect(r.exitStatus == 0, "\(r.output)")
        #expect(r.output.contains("inet 10.200.250.2/30"))
        #expect(r.output.contains("ping-ok"), "\(r.output)")
        let n = ContainerNetwork.names(id: "mvm-net")
        let links = try ProcessRunner.run(["ip", "-o", "link"]).stdoutText
        #expect(!links.contains(n.host))
        #expect(box.leftovers(id: "mvm-net").isEmpty)
    }

    @Test func vsockIsRefusedClearly() async throws {
        var spec = box.spec("vsock", ["true"])
        spec.vsockCID = 42
        await #expect { try await box.backend().run(spec) } throws: { "\($0)".contains("containers have no vsock") }
    }

    @Test func startLatencyBenchmarkRuns() async throws {
        // MVM_CONTAINER_BENCH_ITERATIONS raises the sample count when the figures themselves are wanted.
        let n = Int(ProcessInfo.processInfo.environment["MVM_CONTAINER_BENCH_ITERATIONS"] ?? "") ?? 2
        let s = try await ContainerBench.startLatency(iterations: n, runtime: .runc, rootfs: box.rootfs, paths: box.paths,
                                                      withDocker: n > 2 && TestHost.dockerRunning)
        #expect(s.bareRuntime.total.count == n)
        #expect(s.backend.total.count == n)
        #expect(s.backend.start.count == n)
        #expect(s.overheadMilliseconds != nil)
        func ms(_ v: Double?) -> String { v.map { String(format: "%.1f ms", $0 * 1000) } ?? "-" }
        print("container start latency (\(n) runs, median): bare runc run \(ms(s.bareRuntime.medianTotal)); ContainerBackend total \(ms(s.backend.medianTotal)), to first instruction \(ms(s.backend.medianStart)); docker total \(ms(s.docker?.medianTotal)), to first instruction \(ms(s.docker?.medianStart))")
    }
}
