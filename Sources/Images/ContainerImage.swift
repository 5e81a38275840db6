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
        if let bad = VMSpec.badEnvironmentEntry(env) {
            throw MicroVMError(.invalidImage, "the image's environment has '\(bad)', which is not NAME=VALUE")
        }
        if (entrypoint + cmd + [user]).contains(where: { $0.contains("\u{0}") }) {
            throw MicroVMError(.invalidImage, "the image's configuration has a NUL byte in its command or user")
        }
        if !workingDir.isEmpty, !VMSpec.isWorkingDirectory(workingDir) {
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

    /// The image in `tarball`, with its ext4 disk made when `disk` is true.
    public func prepare(tarball: String, disk: Bool) throws -> ContainerImage {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: tarball, isDirectory: &isDir), !isDir.boolValue else {
            throw MicroVMError.notFound("image tarball '\(tarball)' does not exist: pass a file made by 'docker save' or a tar of an OCI image layout")
        }
        let digest = try digest(of: tarball)
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
        try RootfsBuilder.addMountPoints(to: tmp + "/rootfs")
        try Paths.writeScratch(try JSONEncoder().encode(config), to: tmp + "/" + Self.configName)
        let dir = paths.containerImages + "/" + digest
        try? fm.removeItem(atPath: dir)
        guard rename(tmp, dir) == 0 else {
            throw MicroVMError(.permissionDenied, "cannot move the unpacked image into \(dir): \(String(cString: strerror(errno)))")
        }
        return ContainerImage(digest: digest, directory: dir, config: config)
    }

    /// The tree as ext4, made under a temporary name and renamed into place.
    func makeDisk(_ image: ContainerImage) throws {
        let tmp = image.directory + "/.rootfs-\(getpid()).ext4"
        defer { try? FileManager.default.removeItem(atPath: tmp) }
        try RootfsBuilder.makeExt4(fitting: image.rootfsTree, disk: tmp)
        guard rename(tmp, image.rootfsDisk) == 0 else {
            throw MicroVMError(.permissionDenied, "cannot move the image's disk into \(image.rootfsDisk): \(String(cString: strerror(errno)))")
        }
    }

    /// Removes every unpacked image (`mvm image prune --container-images`) and the remembered
    /// digests; returns how many images there were.
    @discardableResult
    public func removeAll() throws -> Int {
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: paths.containerImages)) ?? []).filter { !$0.hasPrefix(".") }
        try withLock {
            for n in names + [".digests.json"] { try? FileManager.default.removeItem(atPath: paths.containerImages + "/" + n) }
        }
        return names.count
    }

    /// The tarball's SHA-256, hashed once per version of the file: remembered by its device,
    /// inode, size and modification time, so a launch does not read a large image through again.
    func digest(of tarball: String) throws -> String {
        var st = stat()
        guard stat(tarball, &st) == 0 else { return try Self.sha256(file: tarball) }
        let key = "\(st.st_dev):\(st.st_ino):\(st.st_size):\(st.st_mtim.tv_sec).\(st.st_mtim.tv_nsec)"
        let index = paths.containerImages + "/.digests.json"
        var known = (FileManager.default.contents(atPath: index)).flatMap { try? JSONDecoder().decode([String: String].self, from: $0) } ?? [:]
        if let d = known[key] { return d }
        let d = try Self.sha256(file: tarball)
        known[key] = d
        // Best effort: a lost entry costs one more hash.
        if (try? Paths.ensureDirectory(paths.containerImages)) != nil, let data = try? JSONEncoder().encode(known) {
            try? Paths.writeScratch(data, to: index, atomically: true)
        }
        return d
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
