import Foundation
import Crypto
import MicroVMCore

/// What an image says to run, and how: its entrypoint, command, environment, working directory
/// and user, from its configuration (`config` in a `docker save` or OCI image configuration).
public struct ImageConfig: Codable, Sendable, Equatable {
    public var entrypoint: [String] = []
    public var cmd: [String] = []
    public var env: [String] = []
    public var workingDir: String = ""
    public var user: String = ""

    public init(entrypoint: [String] = [], cmd: [String] = [], env: [String] = [], workingDir: String = "", user: String = "") {
        self.entrypoint = entrypoint; self.cmd = cmd; self.env = env; self.workingDir = workingDir; self.user = user
    }

    /// Parses an image configuration document; a field it lacks (or sets to null) is empty.
    public init(json data: Data) throws {
        struct Document: Decodable {
            struct Config: Decodable {
                var Entrypoint: [String]?; var Cmd: [String]?; var Env: [String]?; var WorkingDir: String?; var User: String?
            }
            var config: Config?
        }
        let doc: Document
        do { doc = try JSONDecoder().decode(Document.self, from: data) } catch {
            throw MicroVMError(.invalidImage, "the image's configuration is not an image configuration document: \(error)")
        }
        let c = doc.config
        self.init(entrypoint: c?.Entrypoint ?? [], cmd: c?.Cmd ?? [], env: c?.Env ?? [], workingDir: c?.WorkingDir ?? "", user: c?.User ?? "")
        if let bad = env.first(where: { !$0.contains("=") || $0.hasPrefix("=") }) {
            throw MicroVMError(.invalidImage, "the image's environment has '\(bad)', which is not NAME=VALUE")
        }
        if (entrypoint + cmd + env + [workingDir, user]).contains(where: { $0.contains("\u{0}") }) {
            throw MicroVMError(.invalidImage, "the image's configuration has a NUL byte in its command, environment or working directory")
        }
        if !workingDir.isEmpty, !workingDir.hasPrefix("/") {
            throw MicroVMError(.invalidImage, "the image's working directory '\(workingDir)' is not an absolute path")
        }
    }

    /// The command a run executes: the entrypoint, then the arguments given, else the image's
    /// command (as `docker run IMAGE ARGS…` does).
    public func command(_ args: [String]) -> [String] { entrypoint + (args.isEmpty ? cmd : args) }
}

/// A container image made ready for every mode: its rootfs as a tree (a container's root), as
/// an ext4 disk (a VM's root, made on first need), and its configuration.
public struct ContainerImage: Codable, Sendable, Equatable {
    /// SHA-256 of the tarball it came from (hex): the cache key.
    public var digest: String
    public var directory: String
    public var config: ImageConfig
    public var rootfsTree: String { directory + "/rootfs" }
    public var rootfsDisk: String { directory + "/rootfs.ext4" }
}

/// Image tarballs (`docker save` or an OCI image layout) unpacked once and converted once, kept
/// under `Paths.containerImages` by the tarball's content: the same bytes give the same tree and
/// disk whatever the file is called, and a changed tarball a new one. Builders in several
/// processes take turns under a lock; each build goes to a temporary name and is renamed into place.
public struct ContainerImageStore: Sendable {
    public var paths: Paths
    public init(paths: Paths = .default) { self.paths = paths }

    static let configName = "image.json"
    /// Mount points a guest init or an OCI runtime needs on the root it is given.
    static let mountPoints = ["proc", "sys", "dev", "tmp", "run"]

    /// The image in `tarball`, with its ext4 disk made when `disk` is true.
    public func prepare(tarball: String, disk: Bool) throws -> ContainerImage {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: tarball, isDirectory: &isDir), !isDir.boolValue else {
            throw MicroVMError.notFound("image tarball '\(tarball)' does not exist: pass a file made by 'docker save' or a tar of an OCI image layout")
        }
        let digest = try Self.sha256(file: tarball)
        if let ready = load(digest), !disk || FileManager.default.fileExists(atPath: ready.rootfsDisk) { return ready }
        return try withLock {
            let image = try load(digest) ?? unpack(tarball, digest: digest)
            if disk, !FileManager.default.fileExists(atPath: image.rootfsDisk) { try makeDisk(image) }
            return image
        }
    }

    func load(_ digest: String) -> ContainerImage? {
        let dir = paths.containerImages + "/" + digest
        guard let data = FileManager.default.contents(atPath: dir + "/" + Self.configName),
              let config = try? JSONDecoder().decode(ImageConfig.self, from: data) else { return nil }
        return ContainerImage(digest: digest, directory: dir, config: config)
    }

    /// Unpacks into `.build-DIGEST-PID`, adds the mount points the image lacks, then renames.
    func unpack(_ tarball: String, digest: String) throws -> ContainerImage {
        let fm = FileManager.default
        let tmp = paths.containerImages + "/.build-\(digest)-\(getpid())"
        try? fm.removeItem(atPath: tmp)
        defer { try? fm.removeItem(atPath: tmp) }
        let config = try RootfsSource.extract(tarball: tarball, into: tmp + "/rootfs")
        for dir in Self.mountPoints where !Self.exists(tmp + "/rootfs/" + dir) {
            guard mkdir(tmp + "/rootfs/" + dir, dir == "tmp" ? 0o1777 : 0o755) == 0 else {
                throw MicroVMError(.invalidImage, "cannot make the mount point /\(dir) in the image's rootfs: \(String(cString: strerror(errno)))")
            }
            if dir == "tmp" { chmod(tmp + "/rootfs/tmp", 0o1777) }
        }
        try Paths.writeScratch(try JSONEncoder().encode(config), to: tmp + "/" + Self.configName)
        let dir = paths.containerImages + "/" + digest
        try? fm.removeItem(atPath: dir)
        guard rename(tmp, dir) == 0 else {
            throw MicroVMError(.permissionDenied, "cannot move the unpacked image into \(dir): \(String(cString: strerror(errno)))")
        }
        return ContainerImage(digest: digest, directory: dir, config: config)
    }

    /// The tree as ext4: half as much again as it uses, plus 32 MiB, at least 64 MiB.
    func makeDisk(_ image: ContainerImage) throws {
        let du = try ProcessRunner.check(["du", "-sk", image.rootfsTree], timeout: 300, package: "coreutils").stdoutText
        let used = UInt64(du.split(whereSeparator: \.isWhitespace).first ?? "0") ?? 0
        let size = ByteCount.mebibytes(max(64, (used * 3 / 2) / 1024 + 32))
        let tmp = image.directory + "/.rootfs-\(getpid()).ext4"
        defer { try? FileManager.default.removeItem(atPath: tmp) }
        try RootfsBuilder.makeExt4(tree: image.rootfsTree, disk: tmp, size: size)
        guard rename(tmp, image.rootfsDisk) == 0 else {
            throw MicroVMError(.permissionDenied, "cannot move the image's disk into \(image.rootfsDisk): \(String(cString: strerror(errno)))")
        }
    }

    /// Removes every unpacked image; returns how many there were.
    @discardableResult
    public func removeAll() throws -> Int {
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: paths.containerImages)) ?? []).filter { !$0.hasPrefix(".") }
        try withLock { for n in names { try? FileManager.default.removeItem(atPath: paths.containerImages + "/" + n) } }
        return names.count
    }

    static func exists(_ path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0
    }

    static func sha256(file: String) throws -> String {
        guard let h = FileHandle(forReadingAtPath: file) else {
            throw MicroVMError(.permissionDenied, "cannot read image tarball '\(file)'")
        }
        defer { try? h.close() }
        var hash = SHA256()
        while true {
            let chunk = h.readData(ofLength: 1 << 20)
            if chunk.isEmpty { break }
            hash.update(data: chunk)
        }
        return hash.finalize().map { String(format: "%02x", $0) }.joined()
    }

    private func withLock<T>(_ body: () throws -> T) throws -> T {
        try Paths.ensureDirectory(paths.containerImages)
        return try Paths.withLockFile(paths.containerImages + "/.lock", body)
    }
}
