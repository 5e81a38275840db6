import Foundation
import MicroVMCore

/// Builds the guest and container root filesystem: busybox, the benchmark tools with their
/// shared libraries (the ldd closure, dynamic loader included), the isolation probe compiled
/// statically from images/probe, a minimal /etc, and from that tree an ext4 disk image and a
/// tarball for `docker import`. VMs and containers thereby run byte-identical binaries.
///
/// ```swift
/// let b = RootfsBuilder()
/// try b.buildTree(at: "/tmp/rootfs")
/// try b.makeDisk(tree: "/tmp/rootfs", disk: "/tmp/rootfs.ext4")
/// ```
public struct RootfsBuilder: Sendable {
    /// A benchmark tool: the binary and the Debian package that provides it.
    public struct Tool: Sendable, Equatable {
        public var path: String
        public var package: String
        public init(path: String, package: String) { self.path = path; self.package = package }
    }

    public static let defaultTools = [
        Tool(path: "/usr/bin/sysbench", package: "sysbench"),
        Tool(path: "/usr/bin/stress-ng", package: "stress-ng"),
        Tool(path: "/usr/bin/fio", package: "fio"),
        Tool(path: "/usr/bin/iperf3", package: "iperf3"),
    ]

    /// What compiling the probe needs on the host (checked by path, not copied into the tree).
    public static let buildRequirements = [
        Tool(path: "/usr/bin/gcc", package: "gcc"),
        Tool(path: "/usr/include/stdio.h", package: "libc6-dev"),
    ]

    /// Where the isolation probe lands in the tree (`mvm bench --audit` runs it there).
    public static let probePath = "/usr/bin/mvm-audit"
    /// The probe's C source in the MicroVM source tree.
    public static var defaultProbeSource: String { Paths.sourceDirectory() + "/images/probe/mvm-audit.c" }

    public var tools: [Tool]
    public var busybox: String
    public var diskSize: ByteCount
    /// The probe's source; nil leaves the probe out of the tree.
    public var probeSource: String?

    public init(tools: [Tool] = RootfsBuilder.defaultTools, busybox: String = "/bin/busybox", diskSize: ByteCount = .mebibytes(512),
                probeSource: String? = RootfsBuilder.defaultProbeSource) {
        self.tools = tools
        self.busybox = busybox
        self.diskSize = diskSize
        self.probeSource = probeSource
    }

    /// Installs the tools' packages when a binary is missing (as root), else says what to install.
    public func ensureToolsInstalled() throws {
        let fm = FileManager.default
        let missing = tools.filter { !fm.isExecutableFile(atPath: $0.path) }
            + (probeSource == nil ? [] : Self.buildRequirements.filter { !fm.fileExists(atPath: $0.path) })
        guard !missing.isEmpty else { return }
        let pkgs = missing.map(\.package)
        guard getuid() == 0 else {
            throw MicroVMError.notFound("benchmark tools missing (\(missing.map(\.path).joined(separator: ", "))): run 'apt-get install \(pkgs.joined(separator: " "))'")
        }
        try ProcessRunner.check(["apt-get", "install", "-y", "--no-install-recommends"] + pkgs,
                                environment: ["DEBIAN_FRONTEND": "noninteractive"], timeout: 600)
    }

    public func buildTree(at root: String) throws {
        try ensureToolsInstalled()
        let fm = FileManager.default
        try Paths.ensureDirectory(root)
        let copier = TreeCopier(root: root)
        // Mirror the host's merged-/usr links first so library paths from ldd land where the loader looks.
        for top in ["bin", "sbin", "lib", "lib64"] { try copier.mirror("/" + top) }
        for d in ["usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "run", "root", "var/tmp", "mnt", "tmp"] {
            try fm.createDirectory(atPath: "\(root)/\(d)", withIntermediateDirectories: true)
        }
        chmod("\(root)/tmp", 0o1777)
        chmod("\(root)/var/tmp", 0o1777)

        let bb = try Busybox.staticBinary(busybox)
        try copier.mirror(busybox)
        let bbInTree = "/" + (try copier.resolvedInTree(busybox))
        for tool in tools { try copier.mirror(tool.path) }
        if let probeSource { try Self.compileProbe(source: probeSource, output: root + Self.probePath) }
        for lib in try Self.libraryClosure(of: tools.map(\.path)) { try copier.mirror(lib) }
        for applet in bb.applets {
            let p = "\(root)/\(applet)"
            if fm.fileExists(atPath: p) || (try? fm.destinationOfSymbolicLink(atPath: p)) != nil { continue }
            try? fm.createDirectory(atPath: (p as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            try fm.createSymbolicLink(atPath: p, withDestinationPath: bbInTree)
        }
        let etc: [String: String] = [
            "passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
            "group": "root:x:0:\nnogroup:x:65534:\n",
            "hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            // Guests have no DNS of their own; a backend that gives one network access rewrites this.
            "resolv.conf": "nameserver 127.0.0.1\n",
            "hostname": "mvm\n",
        ]
        for (name, text) in etc { try Data(text.utf8).write(to: URL(fileURLWithPath: "\(root)/etc/\(name)")) }
    }

    /// Compiles the isolation probe as a static binary: it runs unchanged in every backend's
    /// root, whatever libraries that root has.
    public static func compileProbe(source: String, output: String) throws {
        try compileStatic(source: source, output: output, what: "isolation probe")
    }

    /// Compiles one of the image's C programs (images/probe, images/agent) as a static binary.
    public static func compileStatic(source: String, output: String, what: String) throws {
        guard FileManager.default.fileExists(atPath: source) else {
            throw MicroVMError.notFound("\(what) source '\(source)' is missing: set MVM_SOURCE_DIR to the MicroVM source tree")
        }
        try ProcessRunner.check(["gcc", "-static", "-O2", "-Wall", "-o", output, source], timeout: 300, package: "gcc libc6-dev")
    }

    /// Makes the ext4 image straight from the tree (mke2fs -d), so no mount or root is needed.
    public func makeDisk(tree: String, disk: String) throws {
        try Self.makeExt4(tree: tree, disk: disk, size: diskSize)
    }

    /// The mount points a guest init or an OCI runtime needs on the root it is given.
    public static let mountPoints = ["proc", "sys", "dev", "tmp", "run"]

    /// Makes the mount points `tree` lacks (/tmp sticky and world-writable), as runc does on a
    /// container's root.
    public static func addMountPoints(to tree: String) throws {
        for dir in mountPoints {
            let path = tree + "/" + dir
            var st = stat()
            guard lstat(path, &st) != 0 else { continue }
            let mode: mode_t = dir == "tmp" ? 0o1777 : 0o755
            guard mkdir(path, mode) == 0, chmod(path, mode) == 0 else {
                throw MicroVMError(.invalidImage, "cannot make the mount point /\(dir) in \(tree): \(String(cString: strerror(errno)))")
            }
        }
    }

    /// An ext4 image holding `tree`, sized to it: half as much again as the tree uses, plus
    /// 32 MiB, at least 64 MiB.
    public static func makeExt4(fitting tree: String, disk: String) throws {
        let du = try ProcessRunner.check(["du", "-sk", tree], timeout: 300, package: "coreutils").stdoutText
        let used = UInt64(du.split(whereSeparator: \.isWhitespace).first ?? "0") ?? 0
        try makeExt4(tree: tree, disk: disk, size: .mebibytes(max(64, (used * 3 / 2) / 1024 + 32)))
    }

    /// An ext4 image of `size` (at least 16 MiB) holding `tree`, owners and modes as they are.
    public static func makeExt4(tree: String, disk: String, size: ByteCount) throws {
        try? FileManager.default.removeItem(atPath: disk)
        let kib = max(size.bytes / 1024, 16 * 1024)
        try ProcessRunner.check(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "mvm-rootfs", "-E", "root_owner=0:0",
                                 "-d", tree, disk, "\(kib)k"], timeout: 600, package: "e2fsprogs")
    }

    public func makeTarball(tree: String, tarball: String) throws {
        try ProcessRunner.check(["tar", "-C", tree, "--numeric-owner", "--sort=name", "-cf", tarball, "."], timeout: 600, package: "tar")
    }

    /// Every shared object the binaries load, found by ldd, including the dynamic loader.
    static func libraryClosure(of binaries: [String]) throws -> [String] {
        var libs: Set<String> = []
        for bin in binaries {
            let out = try ProcessRunner.run(["ldd", bin], timeout: 60, package: "libc-bin")
            guard out.status == 0 else { continue }   // static binaries: nothing to add
            for line in out.stdoutText.split(separator: "\n") {
                let t = line.trimmingCharacters(in: .whitespaces)
                if t.contains("not found") {
                    throw MicroVMError.notFound("'\(bin)' needs a library that is not installed (\(t)): reinstall its package")
                }
                let path: Substring?
                if let arrow = t.range(of: "=> ") { path = t[arrow.upperBound...].split(separator: " ").first }
                else if t.hasPrefix("/") { path = t.split(separator: " ").first }
                else { path = nil }
                if let path, path.hasPrefix("/") { libs.insert(String(path)) }
            }
        }
        return libs.sorted()
    }
}

/// Copies host paths into a tree at the same place, recreating each symlink on the way, so the
/// tree resolves names exactly as the host does.
struct TreeCopier {
    let root: String

    func mirror(_ hostPath: String, depth: Int = 0) throws {
        guard depth < 32 else { throw MicroVMError(.invalidImage, "too many symlinks resolving '\(hostPath)'") }
        let fm = FileManager.default
        let comps = hostPath.split(separator: "/").map(String.init)
        var cur = ""
        for (i, c) in comps.enumerated() {
            cur += "/" + c
            let inTree = root + cur
            let attrs = try fm.attributesOfItem(atPath: cur)
            let type = attrs[.type] as? FileAttributeType
            if type == .typeSymbolicLink {
                let target = try fm.destinationOfSymbolicLink(atPath: cur)
                if (try? fm.destinationOfSymbolicLink(atPath: inTree)) == nil, !fm.fileExists(atPath: inTree) {
                    try fm.createSymbolicLink(atPath: inTree, withDestinationPath: target)
                }
                let base = target.hasPrefix("/") ? target : ((cur as NSString).deletingLastPathComponent + "/" + target)
                let rest = comps[(i + 1)...].joined(separator: "/")
                try mirror(Self.lexicallyNormalized(rest.isEmpty ? base : base + "/" + rest), depth: depth + 1)
                return
            } else if type == .typeDirectory {
                if !fm.fileExists(atPath: inTree) { try fm.createDirectory(atPath: inTree, withIntermediateDirectories: false) }
            } else {
                guard i == comps.count - 1 else { throw MicroVMError.notFound("'\(cur)' is not a directory") }
                if !fm.fileExists(atPath: inTree) {
                    try fm.copyItem(atPath: cur, toPath: inTree)
                }
            }
        }
    }

    /// Removes ".", ".." and empty components without touching the file system: Foundation's
    /// standardizingPath also resolves symlinks, which would skip links the tree must recreate.
    static func lexicallyNormalized(_ path: String) -> String {
        var out: [Substring] = []
        for c in path.split(separator: "/") {
            if c == "." || c.isEmpty { continue }
            if c == ".." { _ = out.popLast(); continue }
            out.append(c)
        }
        return "/" + out.joined(separator: "/")
    }

    /// The path (relative to the root) that `hostPath` ends up at once symlinks are followed.
    func resolvedInTree(_ hostPath: String) throws -> String {
        let real = (hostPath as NSString).resolvingSymlinksInPath
        return String(real.drop { $0 == "/" })
    }
}
