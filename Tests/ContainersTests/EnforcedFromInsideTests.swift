import Foundation
import Testing
import MicroVMCore
@testable import Containers

/// The slice as the workload feels it, measured from inside the container, for each runtime that
/// runs here: two busy threads under one CPU get about one CPU of work (not two), memory past the
/// limit is OOM-killed, forks past the pids limit fail.
@Suite("Slices enforced, seen from inside", .serialized, .timeLimit(.minutes(5)),
       .enabled(if: TestHost.canRunc && GuestImageTree.path != nil, "needs root, runc and a built guest image (mvm image build)"))
final class EnforcedFromInsideTests {
    let box: Sandbox
    init() throws { box = try Sandbox() }

    static var runtimes: [ContainerRuntime] {
        var r: [ContainerRuntime] = [.runc]
        if ProcessRunner.which("runsc") != nil { r.append(.runsc) } else { print("skipping runsc: not installed (apt-get install runsc)") }
        if TestHost.dockerRunning { r.append(.docker) } else { print("skipping docker: the Docker engine is not running") }
        return r
    }

    /// Both CPUs of this host, shared placement: only the quota can hold the work to one CPU.
    static let slice = ResourceSlice(cpus: 1, placement: .shared, cpuSet: Array(0..<min(2, ProcessInfo.processInfo.activeProcessorCount)),
                                     memory: .mebibytes(128), pidsLimit: 32)

    /// CPU ticks (100 per CPU-second) two busy loops got in 3 s, read from /proc inside.
    static let busy = """
        yes >/dev/null & a=$!; yes >/dev/null & b=$!
        sleep 3
        t=0; for p in $a $b; do set -- $(cat /proc/$p/stat); t=$((t + ${14} + ${15})); done
        kill $a $b
        echo ticks=$t
        """

    @Test(arguments: runtimes)
    func twoBusyThreadsGetAboutOneCPU(runtime: ContainerRuntime) async throws {
        let tree = try #require(GuestImageTree.path)
        let r = try await box.backend(runtime).run(VMSpec(name: "busy-\(runtime)", command: ["sh", "-c", Self.busy], rootfs: tree,
                                                          slice: Self.slice, timeout: 60))
        print("\(runtime) busy: status \(r.exitStatus): \(r.output.suffix(300))")
        let ticks = try #require(r.output.split(separator: "\n").first { $0.hasPrefix("ticks=") }.flatMap { Int($0.dropFirst(6)) }, "\(r.output)")
        let cpus = Double(ticks) / 300
        print("\(runtime): two busy threads under --cpus 1 got \(String(format: "%.2f", cpus)) CPUs of work")
        #expect(cpus <= 1.2, "\(runtime) let two busy threads use \(cpus) CPUs under a one-CPU slice")
        #expect(cpus >= 0.5, "the busy threads barely ran (\(cpus) CPUs): the measurement is broken")
    }

    @Test(arguments: runtimes)
    func memoryPastTheLimitIsKilled(runtime: ContainerRuntime) async throws {
        let tree = try #require(GuestImageTree.path)
        let spec = VMSpec(name: "mem-\(runtime)", command: ["sh", "-c", "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived ${#x}"],
                          rootfs: tree, slice: Self.slice, timeout: 30)
        let r: RunResult
        do {
            r = try await box.backend(runtime).run(spec)
        } catch let e as MicroVMError where e.code == .timeout && runtime == .runsc {
            // gVisor's sandbox shares the container's memory cgroup: at the limit the kernel may
            // kill one of its own processes (the gofer) and leave the sentry waiting. The workload
            // still never held the memory; the hang is the runtime's, and the run was killed.
            print("runsc at its memory limit: the sandbox hung and was killed after \(Int(spec.timeout)) s (\(e.message.prefix(120)))")
            return
        }
        print("\(runtime) memory: status \(r.exitStatus): \(r.output.suffix(300))")
        #expect(!r.output.contains("survived"), "\(runtime) held 200 MB under a 128 MiB limit: \(r.output.suffix(200))")
        #expect(r.exitStatus == 137, "\(runtime): \(r.exitStatus) \(r.output.suffix(200))")
    }

    /// runsc is left out: under its ptrace platform the host's pids limit counts the sandbox's
    /// stub processes and threads, not the workload's processes, so no count inside matches it.
    static var pidsRuntimes: [ContainerRuntime] {
        print("skipping runsc in the pids check: its host pids limit counts the sandbox's own tasks, not the workload's")
        return runtimes.filter { $0 != .runsc }
    }

    @Test(arguments: pidsRuntimes)
    func forksPastThePidsLimitFail(runtime: ContainerRuntime) async throws {
        let tree = try #require(GuestImageTree.path)
        // The forks run in a subshell (a shell that cannot fork gives up); the count uses builtins only.
        let script = "(for i in $(seq 1 60); do sleep 5 & done) 2>/dev/null; set -- /proc/[0-9]*; echo running=$#"
        let r = try await box.backend(runtime).run(VMSpec(name: "pids-\(runtime)", command: ["sh", "-c", script], rootfs: tree,
                                                          slice: Self.slice, timeout: 60))
        print("\(runtime) pids: status \(r.exitStatus): \(r.output.suffix(300))")
        let running = try #require(r.output.split(separator: "\n").first { $0.hasPrefix("running=") }.flatMap { Int($0.dropFirst(8)) }, "\(r.output)")
        #expect(running <= 32, "\(runtime) ran \(running) processes under a pids limit of 32")
        #expect(running >= 8, "too few processes started (\(running)) to show the limit")
    }
}
