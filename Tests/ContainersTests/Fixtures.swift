import Foundation
import MicroVMCore
@testable import Containers

/// A throwaway state directory and a small busybox rootfs (the static busybox the guest image
/// also carries), removed when the fixture goes away.
final class Sandbox {
    let dir: String
    let paths: Paths
    let rootfs: String

    init() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("mvm-ctest-\(UUID().uuidString.prefix(8))").path
        paths = Paths(state: dir + "/state", cache: Paths.default.cache)
        rootfs = dir + "/rootfs"
        try Self.makeBusyboxTree(at: rootfs)
    }

    deinit { try? FileManager.default.removeItem(atPath: dir) }

    static let busybox = ["/bin/busybox", "/usr/bin/busybox"].first { FileManager.default.isExecutableFile(atPath: $0) }

    static func makeBusyboxTree(at root: String) throws {
        let fm = FileManager.default
        for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root"] {
            try fm.createDirectory(atPath: root + "/" + d, withIntermediateDirectories: true)
        }
        guard let bb = busybox else { return }
        try fm.copyItem(atPath: bb, toPath: root + "/bin/busybox")
        let applets = try ProcessRunner.check([bb, "--list"]).stdoutText.split(separator: "\n")
        for a in applets where a != "busybox" {
            try? fm.createSymbolicLink(atPath: root + "/bin/" + a, withDestinationPath: "busybox")
        }
    }

    func backend(_ runtime: ContainerRuntime = .runc) -> ContainerBackend {
        ContainerBackend(runtime: runtime, paths: paths)
    }

    func spec(_ name: String, _ command: [String], slice: ResourceSlice? = nil, timeout: Double = 60) -> VMSpec {
        VMSpec(name: name, command: command, rootfs: rootfs, slice: slice, timeout: timeout)
    }

    /// Everything a container could leave on the host, as paths that still exist.
    func leftovers(id: String) -> [String] {
        let store = ContainerStore(paths: paths)
        var left = CgroupDirs.candidates(id: store.cgroupLeaf(id))
        for p in [store.bundle(id), store.runtimeRoot + "/" + id, "/var/run/netns/" + id] where FileManager.default.fileExists(atPath: p) {
            left.append(p)
        }
        let mounts = (try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)) ?? ""
        for line in mounts.split(separator: "\n") where line.contains(dir) { left.append("mount: " + line) }
        return left
    }
}

enum TestHost {
    static let isRoot = getuid() == 0
    static let hasRunc = ProcessRunner.which("runc") != nil
    static let canRunc = isRoot && hasRunc && Sandbox.busybox != nil
    static let dockerRunning: Bool = {
        guard isRoot, ProcessRunner.which("docker") != nil, FileManager.default.fileExists(atPath: "/var/run/docker.sock") else { return false }
        return (try? ProcessRunner.run(["docker", "version", "--format", "{{.Server.Version}}"], timeout: 20).status) == 0
    }()
    static let hybridCgroups: Bool = {
        FileManager.default.fileExists(atPath: "/sys/fs/cgroup/memory/memory.limit_in_bytes")
            && FileManager.default.fileExists(atPath: "/sys/fs/cgroup/unified/cgroup.procs")
    }()
    static let v1Memory = FileManager.default.fileExists(atPath: "/sys/fs/cgroup/memory/memory.limit_in_bytes")
}

#if canImport(Glibc)
import Glibc
#endif

/// The guest image's rootfs tree when one is built (mvm image build), so containers can be
/// checked with the very binaries the VMs run.
enum GuestImageTree {
    static let path: String? = {
        let dir = Paths.default.images
        let fm = FileManager.default
        let names = ((try? fm.contentsOfDirectory(atPath: dir)) ?? []).filter { !$0.hasPrefix(".") }
        let trees = names.map { dir + "/" + $0 }.filter {
            fm.fileExists(atPath: $0 + "/manifest.json") && fm.fileExists(atPath: $0 + "/rootfs/usr/bin/stress-ng")
        }
        func mtime(_ p: String) -> Date { ((try? fm.attributesOfItem(atPath: p + "/manifest.json"))?[.modificationDate] as? Date) ?? .distantPast }
        return trees.max { mtime($0) < mtime($1) }.map { $0 + "/rootfs" }
    }()
}
