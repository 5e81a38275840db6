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

    /// CPU work measured as work: a loop of shell arithmetic (no system calls) timed alone (the
    /// faster of a run before and one after), and two at once. Two loops that share one CPU take twice as long as one; with two CPUs, as long.
    /// Counting work, not the ticks /proc reports, holds for gVisor too, whose own kernel's tick
    /// accounting cannot see the host's throttling.
    static let busy = """
        loop() { i=0; while [ $i -lt 1000000 ]; do i=$((i+1)); done; }
        cs() { read u _ < /proc/uptime; echo $(( ${u%.*} * 100 + 1${u#*.} - 100 )); }
        t0=$(cs); loop; t1=$(cs)
        loop & a=$!; loop & b=$!; wait $a $b; t2=$(cs)
        loop; t3=$(cs)
        s1=$((t1 - t0)); s2=$((t3 - t2)); [ $s2 -lt $s1 ] && s1=$s2
        echo "single=$(( s1 * 10 )) pair=$(( (t2 - t1) * 10 ))"
        """

    @Test(arguments: runtimes)
    func twoBusyThreadsGetAboutOneCPU(runtime: ContainerRuntime) async throws {
        let tree = try #require(GuestImageTree.path)
        let r = try await box.backend(runtime).run(VMSpec(name: "busy-\(runtime)", command: ["sh", "-c", Self.busy], rootfs: tree,
                                                          slice: Self.slice, timeout: 120))
        print("\(runtime) busy: status \(r.exitStatus): \(r.output.suffix(300))")
        let line = try #require(r.output.split(separator: "\n").first { $0.hasPrefix("single=") }, "\(r.output)")
        let fields = Dictionary(uniqueKeysWithValues: line.split(separator: " ").compactMap { f -> (String, Double)? in
            let kv = f.split(separator: "=")
            return kv.count == 2 ? (String(kv[0]), Double(kv[1]) ?? 0) : nil
        })
        let single = try #require(fields["single"]), pair = try #require(fields["pair"])
        #expect(single > 100, "one loop took \(single) ms: too short to measure")
        let cpus = 2 * single / max(pair, 1)
        print("\(runtime): two busy loops under --cpus 1 got \(String(format: "%.2f", cpus)) CPUs of work (one alone \(single) ms, two \(pair) ms)")
        #expect(cpus <= 1.25, "\(runtime) let two busy loops use \(cpus) CPUs under a one-CPU slice")
        #expect(cpus >= 0.5, "the busy loops barely ran (\(cpus) CPUs): the measurement is broken")
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
