import Foundation
import Testing
import Allocator
import MicroVMCore
@testable import Containers

@Suite("OCI config")
struct OCISpecTests {
    let slice = ResourceSlice(cpus: 1, placement: .pinned, cpuSet: [0, 1], cpuWeight: 200, cpuQuota: 0.5,
                              memory: .mebibytes(64), pidsLimit: 32, numaNode: 0)

    func config() throws -> [String: Any] {
        let spec = try OCISpec.make(ContainerOptions(rootfs: "/r", command: ["echo", "hi"], hostname: "h",
                                                     cgroupsPath: "/microvm/mvm-h", enforcement: Enforcement(slice: slice, mode: .container), netnsPath: "/var/run/netns/mvm-h"))
        let obj = try JSONSerialization.jsonObject(with: try spec.encoded())
        return try #require(obj as? [String: Any])
    }

    @Test func followsTheRuntimeSpecShape() throws {
        let c = try config()
        #expect(c["ociVersion"] as? String == "1.0.2")
        let root = try #require(c["root"] as? [String: Any])
        #expect(root["path"] as? String == "/r")
        #expect(root["readonly"] as? Bool == true)
        let process = try #require(c["process"] as? [String: Any])
        #expect(process["args"] as? [String] == ["echo", "hi"])
        #expect(process["noNewPrivileges"] as? Bool == true)
        let caps = try #require((process["capabilities"] as? [String: Any])?["bounding"] as? [String])
        #expect(caps.contains("CAP_KILL"))
        #expect(!caps.contains("CAP_SYS_ADMIN"))
        #expect(!caps.contains("CAP_NET_ADMIN"))
        let rl = try #require((process["rlimits"] as? [[String: Any]])?.first)
        #expect(rl["type"] as? String == "RLIMIT_NOFILE")
        let mounts = try #require(c["mounts"] as? [[String: Any]])
        let dests = mounts.compactMap { $0["destination"] as? String }
        for d in ["/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/sys/fs/cgroup", "/tmp"] {
            #expect(dests.contains(d), "missing mount \(d)")
        }
        let sys = try #require(mounts.first { $0["destination"] as? String == "/sys" })
        #expect((sys["options"] as? [String])?.contains("ro") == true)
        // Absent optional fields stay out of the file rather than being written as null.
        #expect(!String(decoding: try OCISpec.make(ContainerOptions(rootfs: "/r", command: ["x"], hostname: "h", cgroupsPath: "/microvm/x")).encoded(), as: UTF8.self).contains("null"))
    }

    @Test func namespacesMasksAndSeccomp() throws {
        let linux = try #require(try config()["linux"] as? [String: Any])
        let ns = try #require(linux["namespaces"] as? [[String: Any]])
        #expect(Set(ns.compactMap { $0["type"] as? String }) == ["pid", "ipc", "uts", "mount", "network"])
        #expect(ns.first { $0["type"] as? String == "network" }?["path"] as? String == "/var/run/netns/mvm-h")
        #expect((linux["maskedPaths"] as? [String])?.contains("/proc/kcore") == true)
        #expect((linux["readonlyPaths"] as? [String])?.contains("/proc/sys") == true)
        #expect(linux["cgroupsPath"] as? String == "/microvm/mvm-h")
        let sc = try #require(linux["seccomp"] as? [String: Any])
        #expect(sc["defaultAction"] as? String == "SCMP_ACT_ALLOW")
        #expect((sc["architectures"] as? [String])?.contains("SCMP_ARCH_X86_64") == true)
        let rule = try #require((sc["syscalls"] as? [[String: Any]])?.first)
        #expect(rule["action"] as? String == "SCMP_ACT_ERRNO")
        #expect(rule["errnoRet"] as? Int == Int(EPERM))
        let names = try #require(rule["names"] as? [String])
        for s in ["kexec_load", "init_module", "finit_module", "delete_module", "reboot", "swapon", "bpf",
                  "perf_event_open", "keyctl", "add_key", "request_key", "userfaultfd", "ptrace"] {
            #expect(names.contains(s), "\(s) not denied")
        }
        #expect(!names.contains("clone") && !names.contains("execve"))
    }

    @Test func sliceBecomesCgroupLimits() throws {
        let r = OCISpec.resources(for: Enforcement(slice: slice, mode: .container))
        #expect(r.cpu?.cpus == "0-1")
        #expect(r.cpu?.mems == "0")
        #expect(r.cpu?.shares == 2048)
        #expect(r.cpu?.quota == 50_000)
        #expect(r.cpu?.period == 100_000)
        #expect(r.memory?.limit == 64 << 20)
        #expect(r.memory?.swap == 64 << 20)   // swap equal to the limit: no swap at all
        #expect(r.pids?.limit == 32)
        #expect(CgroupSet.shares(weight: 100) == 1024)
        #expect(CgroupSet.shares(weight: 1) == 10)
        #expect(CgroupSet.shares(weight: 10_000) == 102_400)
        #expect(OCISpec.resources(for: nil).cpu == nil)
    }

    @Test func dockerFlagsMatchTheSlice() {
        let f = DockerDriver.resourceFlags(Enforcement(slice: slice, mode: .container))
        func value(_ flag: String) -> String? { f.firstIndex(of: flag).map { f[$0 + 1] } }
        #expect(value("--cpuset-cpus") == "0-1")
        #expect(value("--cpu-quota") == "50000" && value("--cpu-period") == "100000")
        #expect(value("--cpu-shares") == "2048")
        #expect(value("--memory") == "67108864b")
        #expect(value("--memory-swap") == "67108864b")
        #expect(value("--pids-limit") == "32")
    }

    @Test func emptyCommandIsRefused() {
        #expect(throws: MicroVMError.self) {
            try OCISpec.make(ContainerOptions(rootfs: "/r", command: [], hostname: "h", cgroupsPath: "/microvm/x"))
        }
    }

    @Test func namesAreCheckedBeforeTheyReachPaths() throws {
        #expect(try ContainerBackend.containerID(name: "web-1.a_b") == "mvm-web-1.a_b")
        for bad in ["", "../etc", "a/b", ".hidden", "x y", String(repeating: "a", count: 49)] {
            #expect(throws: MicroVMError.self) { try ContainerBackend.containerID(name: bad) }
        }
    }

    @Test func runtimeNames() {
        #expect(ContainerRuntime(parsing: "runc") == .runc)
        #expect(ContainerRuntime(parsing: "docker") == .docker)
        #expect(ContainerRuntime(parsing: "auto") == .automatic)
        let custom: ContainerRuntime = "/opt/x/runc"
        #expect(custom == .oci(path: "/opt/x/runc"))
    }

    @Test func vethNamesFitTheKernelLimit() {
        let n = ContainerNetwork.names(id: "mvm-" + String(repeating: "x", count: 48))
        #expect(n.host.count <= 15 && n.peer.count <= 15)
        #expect(n.host != ContainerNetwork.names(id: "mvm-y").host)
        #expect(HostLinks.subnet(0) == ("10.200.0.1", "10.200.0.2"))
        #expect(HostLinks.subnet(64) == ("10.200.1.1", "10.200.1.2"))
    }

    @Test func diskIsOneDirectoryAtMnt() throws {
        let dir = NSTemporaryDirectory()
        #expect(try ContainerBackend.diskBinds([]).isEmpty)
        let b = try ContainerBackend.diskBinds([DiskSpec(path: dir, readOnly: true)])
        #expect(b.count == 1 && b[0].source == dir && b[0].destination == "/mnt" && b[0].readOnly)
        #expect(throws: MicroVMError.self) { _ = try ContainerBackend.diskBinds([DiskSpec(path: "/etc/hostname")]) }
        #expect(throws: MicroVMError.self) { _ = try ContainerBackend.diskBinds([DiskSpec(path: dir), DiskSpec(path: dir)]) }
    }
}
