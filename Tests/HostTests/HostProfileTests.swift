import Testing
import Foundation
@testable import Host
import KVM
import MicroVMCore

/// Builds a fake /proc and /sys tree in a temp directory.
struct FakeHost {
    let dir: String
    init(files: [String: String]) throws {
        dir = NSTemporaryDirectory() + "mvm-fakehost-\(UUID().uuidString)"
        for (path, content) in files {
            let full = dir + "/" + path
            try FileManager.default.createDirectory(atPath: (full as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            try content.write(toFile: full, atomically: true, encoding: .utf8)
        }
    }
    var roots: HostRoots { HostRoots(proc: dir + "/proc", sys: dir + "/sys") }
    func remove() { try? FileManager.default.removeItem(atPath: dir) }
}

@Suite struct HostProfileTests {
    let absent = KVMProbeResult(verdict: .absent, reason: "test")

    @Test func readsAWellFormedFakeHost() throws {
        let h = try FakeHost(files: [
            "proc/meminfo": "MemTotal:       8000000 kB\nMemFree:  100 kB\nMemAvailable:   4000000 kB\n",
            "proc/cpuinfo": "processor\t: 0\nmodel name\t: Test CPU 9000\n",
            "proc/self/mounts": "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n",
            "proc/sys/kernel/osrelease": "6.1.0-test\n",
            "sys/devices/system/cpu/online": "0-3,6\n",
        ])
        defer { h.remove() }
        let p = HostProfile.probe(roots: h.roots, kvm: absent)
        #expect(p.onlineCPUs == [0, 1, 2, 3, 6])
        #expect(p.memoryTotal == .kibibytes(8_000_000))
        #expect(p.memoryAvailable == .kibibytes(4_000_000))
        #expect(p.cgroupMode == .v2)
        #expect(p.cpuModel == "Test CPU 9000")
        #expect(p.kernel == "6.1.0-test")
    }

    @Test func malformedHostIsReportedNotFatal() throws {
        let h = try FakeHost(files: [
            "proc/meminfo": "garbage\n\u{0}\u{1}MemTotal: lots kB\n:::\n",
            "proc/cpuinfo": "",
            "proc/self/mounts": "short line\n\n",
            "sys/devices/system/cpu/online": "3-1,x\n",
        ])
        defer { h.remove() }
        let p = HostProfile.probe(roots: h.roots, kvm: absent)
        #expect(p.onlineCPUs.isEmpty)
        #expect(p.memoryTotal == 0)
        #expect(p.cgroupMode == .none)
        #expect(p.kernel == "unknown")
        #expect(p.cpuModel == "unknown")
    }

    @Test func missingRootsAreReportedNotFatal() {
        let p = HostProfile.probe(roots: HostRoots(proc: "/nonexistent/proc", sys: "/nonexistent/sys"), kvm: absent)
        #expect(p.onlineCPUs.isEmpty)
        #expect(p.cgroupMode == .none)
    }

    @Test(arguments: [
        ("cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n", CgroupMode.hybrid),
        ("cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup /sys/fs/cgroup/systemd cgroup rw,name=systemd 0 0\n", .v1),
        ("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n", .v2),
        ("proc /proc proc rw 0 0\n", CgroupMode.none),
    ])
    func cgroupModes(mounts: String, expected: CgroupMode) {
        #expect(HostProfile.detectCgroupMode(mounts: mounts) == expected)
    }

    @Test(.enabled(if: ProcessRunner.which("crun") != nil, "crun is not installed (apt-get install crun)"))
    func crunIsRefusedOnHybridWithAFix() {
        let c = HostProfile.probeRuntime("crun", cgroupMode: .hybrid)
        #expect(!c.usable)
        #expect(c.fix?.contains("runc") == true)
    }
}

@Suite struct RealHostTests {
    @Test func realHostProfileIsComplete() {
        let p = HostProfile.probe(roots: HostRoots(), kvm: KVMProbeResult(verdict: .absent, reason: "not probed in this test"))
        #expect(!p.onlineCPUs.isEmpty)
        #expect(p.memoryTotal > .mebibytes(64))
        #expect(p.cgroupMode != .none)
        for name in ["qemu", "libvirt-embed", "runc", "crun", "docker", "libguestfs"] {
            #expect(p.capabilities[name] != nil, "capability \(name) missing")
        }
    }
}
