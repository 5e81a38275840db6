import Foundation
import Testing
import Host
import MicroVMCore
@testable import Allocator

private let cgroupMode = HostProfile.detectCgroupMode(mounts: (try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8)) ?? "")
private let canUseCgroups = getuid() == 0 && cgroupMode != .none
    && (access("/sys/fs/cgroup/cpuset/cgroup.procs", W_OK) == 0 || access("/sys/fs/cgroup/cgroup.procs", W_OK) == 0)

/// Real cgroups and real affinity: a child process is moved in and the kernel's values read back.
@Suite(.serialized, .timeLimit(.minutes(2))) struct EnforcementTests {
    static func lastCPU() throws -> Int {
        try #require(try HostCapacity.probe(reservation: Fixture.reservation(memory: 0)).onlineCPUs.last)
    }

    @Test(.enabled(if: canUseCgroups, "needs root and a writable cgroup hierarchy (cgroup v1, hybrid or v2)"))
    func aSliceIsEnforcedOnARealProcess() throws {
        let cpu = try Self.lastCPU()
        let slice = ResourceSlice(cpus: 1, placement: .pinned, cpuSet: [cpu], cpuWeight: 50, cpuQuota: 0.5,
                                  memory: .mebibytes(64), pidsLimit: 32)
        let name = "microvm/alloc-test-\(getpid())"
        let cgroup = try CgroupSet.create(name: name, slice: slice)
        let child = try Process.run(URL(fileURLWithPath: "/bin/sleep"), arguments: ["30"])
        defer {
            if child.isRunning { child.terminate(); child.waitUntilExit() }
            try? cgroup.remove()
        }
        try cgroup.add(pid: child.processIdentifier)
        let v = try cgroup.readBack()
        #expect(v.cpus == [cpu])
        #expect(v.memoryLimit == .mebibytes(64))
        #expect(v.pidsMax == 32)
        #expect(v.cpuQuotaMicros == 50_000 && v.cpuPeriodMicros == 100_000)
        if cgroup.mode == .v2 { #expect(v.cpuWeight == 50) } else { #expect(v.cpuShares == 512) }
        #expect(v.processes.contains(child.processIdentifier))
        #expect(try ThreadAffinity.allowedCPUs(pid: child.processIdentifier) == [cpu])

        // A nested cgroup below the leaf goes first; the child is moved out, not killed.
        let nested = try #require(cgroup.directories[cgroup.mode == .v2 ? "unified" : "cpuset"]) + "/inner"
        #expect(mkdir(nested, 0o755) == 0)
        try cgroup.remove()
        for dir in cgroup.directories.values { #expect(access(dir, F_OK) != 0, "\(dir) is still there") }
        #expect(child.isRunning)
        #expect(try ThreadAffinity.allowedCPUs(pid: child.processIdentifier) != [cpu] || (try Self.lastCPU()) == 0)
        try cgroup.remove()
    }

    @Test(.enabled(if: canUseCgroups, "needs root and a writable cgroup hierarchy"))
    func unlimitedValuesAndThreadsGoIn() throws {
        let slice = ResourceSlice(cpus: 1, placement: .shared, memory: .mebibytes(128))
        let cgroup = try CgroupSet.create(name: "microvm/alloc-test-\(getpid())-b", slice: slice)
        defer { try? cgroup.remove() }
        let v = try cgroup.readBack()
        #expect(v.cpuQuotaMicros == nil && v.pidsMax == nil && v.memoryLimit == .mebibytes(128))
        let online = try HostCapacity.probe(reservation: Fixture.reservation(memory: 0)).onlineCPUs
        #expect(!(v.cpus ?? []).isEmpty && Set(v.cpus ?? []).isSubset(of: online), "an empty cpuSet takes the parent's CPUs")

        let child = try Process.run(URL(fileURLWithPath: "/bin/sleep"), arguments: ["30"])
        defer { child.terminate(); child.waitUntilExit() }
        try cgroup.add(thread: child.processIdentifier)
        #expect(try cgroup.readBack().processes == [child.processIdentifier])
    }

    @Test func badCgroupNamesAreRefused() throws {
        for name in ["", "/abs", "microvm/../x", "a//b", "microvm/."] {
            #expect(throws: MicroVMError.self) { try CgroupSet.create(name: name, slice: ResourceSlice(cpus: 1, memory: .mebibytes(64))) }
        }
    }

    @Test func v1MountsAreFoundPerController() throws {
        let mounts = """
            cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0
            cgroup /sys/fs/cgroup/cpuset cgroup rw,cpuset 0 0
            cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0
            cgroup /sys/fs/cgroup/pids cgroup rw,pids 0 0
            cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0
            """
        let m = try CgroupSet.mountPoints(mounts, mode: .hybrid)
        #expect(m["cpu"] == "/sys/fs/cgroup/cpu,cpuacct" && m["cpuset"] == "/sys/fs/cgroup/cpuset" && m["unified"] == nil)
        #expect(try CgroupSet.mountPoints(mounts, mode: .v2)["unified"] == "/sys/fs/cgroup/unified")
        #expect(throws: MicroVMError.self) { try CgroupSet.mountPoints("cgroup /x cgroup rw,cpu 0 0", mode: .v1) }
        #expect(throws: MicroVMError.self) { try CgroupSet.mountPoints("", mode: .none) }
        #expect(CgroupSet.shares(weight: 100) == 1024 && CgroupSet.shares(weight: 1) == 10)
    }

    @Test func aThreadIsPinnedAndReadBack() throws {
        let cpu = try Self.lastCPU()
        let box = ThreadResult()
        let done = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        let thread = Thread {
            let tid = NativeThread.currentID()
            do {
                try ThreadAffinity.pin(to: [cpu])
                box.set(tid: tid, affinity: try ThreadAffinity.affinity())
            } catch { box.set(error: "\(error)") }
            done.signal()
            release.wait()
        }
        thread.start()
        done.wait()
        defer { release.signal() }
        let (tid, affinity, error) = box.get()
        #expect(error == nil)
        #expect(tid != getpid(), "a thread of its own")
        #expect(affinity == [cpu])
        #expect(try ThreadAffinity.allowedCPUs(pid: getpid(), thread: tid) == [cpu])
        #expect(throws: MicroVMError.self) { try ThreadAffinity.pin(to: []) }
        #expect(throws: MicroVMError.self) { try ThreadAffinity.pin(to: [100_000]) }
    }
}

private final class ThreadResult: @unchecked Sendable {
    private let lock = NSLock()
    private var tid: Int32 = 0, affinity: [Int] = [], error: String?
    func set(tid: Int32 = 0, affinity: [Int] = [], error: String? = nil) {
        lock.lock(); self.tid = tid; self.affinity = affinity; self.error = error; lock.unlock()
    }
    func get() -> (Int32, [Int], String?) { lock.lock(); defer { lock.unlock() }; return (tid, affinity, error) }
}
