/// Images: the guest kernel, initramfs and root filesystem every MicroVM backend boots, and the
/// cache that keeps them. Artifacts are keyed by a hash of their inputs (recipe files, kernel
/// version, tool package versions), so asking again costs a directory lookup.
///
/// ```swift
/// let image = try ImageStore().ensureDefault()
/// let cmdline = KernelCommandLine.build(command: ["uname", "-r"])
/// // qemu-system-x86_64 -kernel image.kernel -initrd image.initrd -append cmdline \
/// //   -drive file=image.rootfsDisk,format=raw,if=virtio
/// ```
import Crypto
import Foundation
import MicroVMCore
#if canImport(Glibc)
import Glibc
#endif

/// A built guest image: every path is inside one cache directory that is complete once it exists.
public struct GuestImage: Sendable, Equatable, Codable {
    public var key: String
    public var directory: String
    public var kernelVersion: String
    public var hasPVHNote: Bool
    public var pvhEntry: UInt32?
    public var modules: [KernelModule]

    public var kernel: String { directory + "/vmlinuz" }
    public var vmlinux: String { directory + "/vmlinux" }
    public var initrd: String { directory + "/initrd.img" }
    public var rootfsDisk: String { directory + "/rootfs.ext4" }
    public var rootfsTree: String { directory + "/rootfs" }
    public var rootfsTarball: String { directory + "/rootfs.tar" }

}

/// One cached image as `mvm image list` shows it.
public struct ImageInfo: Sendable, Equatable, Codable {
    public var key: String
    public var directory: String
    public var kernelVersion: String
    public var hasPVHNote: Bool
    public var moduleCount: Int
    public var createdAt: Date
    public var sizeBytes: UInt64
    /// Whether this is the image the current inputs (kernel, recipes, packages) would produce.
    public var isCurrent: Bool
}

/// Builds and caches guest images under `paths.images`, one directory per input hash.
/// A lock file serialises builders across processes; a build goes to a temporary directory
/// that is renamed into place only when complete.
public struct ImageStore: Sendable {
    public var paths: Paths
    /// Where images/init lives (the repository, or MVM_SOURCE_DIR).
    public var sourceDirectory: String

    /// Bumped when the recipe in this file changes in a way the hashed inputs do not show.
    static let recipeVersion = "mvm-image-2"
    static let manifestName = "manifest.json"

    public init(paths: Paths = .default, sourceDirectory: String = Paths.sourceDirectory()) {
        self.paths = paths
        self.sourceDirectory = sourceDirectory
    }

    var initScript: String { sourceDirectory + "/images/init" }

    /// Returns the image for the current inputs, building it first when it is not cached.
    /// On a launch this is a few `stat` calls and one manifest read: the key is remembered
    /// (`ImageKeyCache`) until a package, kernel or recipe file changes.
    public func ensureDefault() throws -> GuestImage {
        if let key = keyCache.lookup(), let img = load(key: key) { return img }
        let fingerprint = keyCache.fingerprint()
        let inputs = try ImageInputs.current(initScript: initScript)
        let img = try load(key: inputs.key) ?? withLock { try load(key: inputs.key) ?? build(inputs: inputs) }
        keyCache.remember(img.key, fingerprint: fingerprint)
        return img
    }

    var keyCache: ImageKeyCache { ImageKeyCache(path: paths.images + "/.key-cache.json", initScript: initScript) }

    /// Builds the image for the current inputs; `force` rebuilds even when it is cached.
    @discardableResult
    public func build(force: Bool) throws -> GuestImage {
        let inputs = try ImageInputs.current(initScript: initScript)
        return try withLock {
            if !force, let img = load(key: inputs.key) { return img }
            return try build(inputs: inputs)
        }
    }

    public func list() -> [ImageInfo] {
        let fm = FileManager.default
        let current = try? ImageInputs.current(initScript: initScript).key
        let names = (try? fm.contentsOfDirectory(atPath: paths.images)) ?? []
        return names.filter { !$0.hasPrefix(".") }.sorted().compactMap { name -> ImageInfo? in
            guard let img = load(key: name) else { return nil }
            let attrs = try? fm.attributesOfItem(atPath: img.directory + "/" + Self.manifestName)
            let size = [img.kernel, img.vmlinux, img.initrd, img.rootfsTarball].reduce(UInt64(0)) { sum, p in
                sum + ((try? fm.attributesOfItem(atPath: p))?[.size] as? UInt64 ?? 0)
            } + Self.allocatedBytes(img.rootfsDisk)
            return ImageInfo(key: img.key, directory: img.directory, kernelVersion: img.kernelVersion, hasPVHNote: img.hasPVHNote,
                             moduleCount: img.modules.count, createdAt: attrs?[.modificationDate] as? Date ?? Date(timeIntervalSince1970: 0),
                             sizeBytes: size, isCurrent: name == current)
        }
    }

    /// Removes cached images the current inputs no longer produce, and any leftover build
    /// directories; returns the keys removed. A VM still running from one keeps its open files.
    @discardableResult
    public func prune() throws -> [String] {
        let current = try ImageInputs.current(initScript: initScript).key
        return try withLock {
            let fm = FileManager.default
            var removed: [String] = []
            for name in (try? fm.contentsOfDirectory(atPath: paths.images)) ?? [] where name != ".lock" && name != current {
                let isImage = load(key: name) != nil
                guard isImage || name.hasPrefix(".build-") || name.hasPrefix(".old-") else { continue }
                try fm.removeItem(atPath: paths.images + "/" + name)
                if isImage { removed.append(name) }
            }
            return removed.sorted()
        }
    }

    /// Loads a complete image; a directory without a readable manifest is not one.
    func load(key: String) -> GuestImage? {
        let dir = paths.images + "/" + key
        guard let data = FileManager.default.contents(atPath: dir + "/" + Self.manifestName),
              var img = try? JSONDecoder().decode(GuestImage.self, from: data) else { return nil }
        img.directory = dir
        return img
    }

    private func withLock<T>(_ body: () throws -> T) throws -> T {
        try Paths.ensureDirectory(paths.images)
        return try Paths.withLockFile(paths.images + "/.lock", body)
    }

    /// Runs with the lock held: builds into .build-KEY-PID, then renames it into place.
    private func build(inputs: ImageInputs) throws -> GuestImage {
        let fm = FileManager.default
        // Any build directory seen under the lock belongs to a builder that died.
        for name in (try? fm.contentsOfDirectory(atPath: paths.images)) ?? [] where name.hasPrefix(".build-") || name.hasPrefix(".old-") {
            try? fm.removeItem(atPath: paths.images + "/" + name)
        }
        let tmp = paths.images + "/.build-\(inputs.key)-\(getpid())"
        try Paths.ensureDirectory(tmp)
        do {
            var img = GuestImage(key: inputs.key, directory: tmp, kernelVersion: inputs.kernel.version, hasPVHNote: false, pvhEntry: nil, modules: [])
            try fm.copyItem(atPath: inputs.kernel.bzImage, toPath: img.kernel)
            let info = try VmlinuxExtractor.extract(bzImage: img.kernel, to: img.vmlinux)
            img.hasPVHNote = info.hasPVHNote
            img.pvhEntry = info.pvhEntry
            let manifest = try InitramfsBuilder(kernel: inputs.kernel, initScript: initScript,
                                                agentSource: ImageInputs.agentSource(initScript: initScript)).build(to: img.initrd)
            img.modules = manifest.modules
            let rootfs = RootfsBuilder()
            try rootfs.buildTree(at: img.rootfsTree)
            try rootfs.makeDisk(tree: img.rootfsTree, disk: img.rootfsDisk)
            try rootfs.makeTarball(tree: img.rootfsTree, tarball: img.rootfsTarball)
            try Data(inputs.description.utf8).write(to: URL(fileURLWithPath: tmp + "/inputs.txt"))
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys]
            let final = paths.images + "/" + inputs.key
            img.directory = final
            // The manifest is written last: its presence is what marks the directory complete.
            try enc.encode(img).write(to: URL(fileURLWithPath: tmp + "/" + Self.manifestName), options: .atomic)

            if fm.fileExists(atPath: final) {
                let old = paths.images + "/.old-\(inputs.key)-\(getpid())"
                try fm.moveItem(atPath: final, toPath: old)
                try fm.moveItem(atPath: tmp, toPath: final)
                try? fm.removeItem(atPath: old)
            } else {
                try fm.moveItem(atPath: tmp, toPath: final)
            }
            return img
        } catch {
            try? fm.removeItem(atPath: tmp)
            throw error
        }
    }

    static func allocatedBytes(_ path: String) -> UInt64 {
        var st = stat()
        guard stat(path, &st) == 0 else { return 0 }
        return UInt64(st.st_blocks) * 512
    }
}

/// Everything an image is made from, and the hash that names it.
struct ImageInputs {
    var kernel: DebianKernel
    var description: String
    var key: String

    /// The recipe as this binary has it: its version and its lists of modules and tools.
    static var recipeLines: [String] {
        ["recipe=\(ImageStore.recipeVersion)", "modules=\(ModuleResolver.defaultModules.joined(separator: ","))",
         "tools=\(RootfsBuilder.defaultTools.map(\.path).joined(separator: ","))"]
    }

    static let packages = ["busybox-static", "sysbench", "stress-ng", "fio", "iperf3", "libc6", "e2fsprogs"]

    /// The recipe's directories of C sources beside the init: its probes and its agent.
    static func sourceDirectories(initScript: String) -> [String] {
        ["probe", "agent"].map { (initScript as NSString).deletingLastPathComponent + "/" + $0 }
    }

    /// The agent's source, which the initramfs carries compiled.
    static func agentSource(initScript: String) -> String { (initScript as NSString).deletingLastPathComponent + "/agent/mvm-agent.c" }

    /// The recipe's own files: the guest init, and every file of its source directories.
    static func recipeFiles(initScript: String) -> [String] {
        [initScript] + sourceDirectories(initScript: initScript).flatMap { dir in
            ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).sorted().map { dir + "/" + $0 }
        }
    }

    static func current(initScript: String, dpkgStatus: String = DpkgStatus.defaultPath) throws -> ImageInputs {
        let kernel = try DebianKernel.newest()
        guard let initData = FileManager.default.contents(atPath: initScript) else {
            throw MicroVMError.notFound("guest init '\(initScript)' is missing: set MVM_SOURCE_DIR to the MicroVM source tree")
        }
        let fm = FileManager.default
        let kattrs = try? fm.attributesOfItem(atPath: kernel.bzImage)
        let kdep = try? fm.attributesOfItem(atPath: kernel.modulesDirectory + "/modules.dep")
        let versions = try DpkgStatus.installedVersions(of: packages, statusFile: dpkgStatus)
        let recipe = recipeLines
        var lines = [recipe[0],
                     "kernel=\(kernel.version) size=\(kattrs?[.size] as? UInt64 ?? 0) mtime=\((kattrs?[.modificationDate] as? Date)?.timeIntervalSince1970 ?? 0)",
                     "modules.dep size=\(kdep?[.size] as? UInt64 ?? 0) mtime=\((kdep?[.modificationDate] as? Date)?.timeIntervalSince1970 ?? 0)"]
            + recipe.dropFirst()
        lines += versions.map { "package \($0)" }.sorted()
        let description = lines.joined(separator: "\n") + "\n"
        var hash = SHA256()
        hash.update(data: Data(description.utf8))
        hash.update(data: initData)
        for probe in recipeFiles(initScript: initScript).dropFirst() {
            guard let data = fm.contents(atPath: probe) else { continue }
            hash.update(data: Data(("\n" + (probe as NSString).lastPathComponent + "\n").utf8))
            hash.update(data: data)
        }
        let digest = hash.finalize().map { String(format: "%02x", $0) }.joined()
        let key = "debian-\(kernel.version)-" + String(digest.prefix(16))
        return ImageInputs(kernel: kernel, description: description, key: key)
    }
}

/// The image key without re-deriving it: a launch must not read package databases or hash the
/// recipe. The key is remembered with a fingerprint of everything it depends on (the dpkg status
/// file, /boot, /lib/modules and the recipe files, by inode, size and modification time); while
/// the fingerprint holds, the key does too, and finding it costs a few `stat` calls.
struct ImageKeyCache {
    var path: String
    var initScript: String
    var watched: [String] = [DpkgStatus.defaultPath, "/boot", "/lib/modules"]

    struct Entry: Codable { var fingerprint: String; var key: String }

    func fingerprint() -> String {
        // What the key hashes besides files: the recipe's lists, compiled into this binary.
        var parts = ImageInputs.recipeLines + ["packages=\(ImageInputs.packages.joined(separator: ","))"]
        // depmod rewrites a kernel's modules.dep without touching /lib/modules itself.
        let kernels = ((try? FileManager.default.contentsOfDirectory(atPath: "/lib/modules")) ?? []).sorted()
        let moduleDeps = watched.contains("/lib/modules") ? kernels.map { "/lib/modules/\($0)/modules.dep" } : []
        for p in watched + moduleDeps + ImageInputs.sourceDirectories(initScript: initScript) + ImageInputs.recipeFiles(initScript: initScript) {
            parts.append(FileStamp.of(p) ?? "\(p) absent")
        }
        return parts.joined(separator: "\n")
    }

    /// The remembered key, if everything it was derived from is unchanged.
    func lookup() -> String? {
        guard let data = FileManager.default.contents(atPath: path),
              let entry = try? JSONDecoder().decode(Entry.self, from: data), entry.fingerprint == fingerprint() else { return nil }
        return entry.key
    }

    /// Remembers `key` for the fingerprint taken before it was derived (so a change made while
    /// deriving it is seen next time). Best effort: a cache that cannot be written costs a
    /// derivation on the next launch, nothing more.
    func remember(_ key: String, fingerprint: String) {
        guard let data = try? JSONEncoder().encode(Entry(fingerprint: fingerprint, key: key)) else { return }
        try? data.write(to: URL(fileURLWithPath: path), options: .atomic)
    }
}

/// Installed package versions, read from dpkg's status file in-process (what `dpkg-query -W`
/// prints, without starting it).
enum DpkgStatus {
    static let defaultPath = "/var/lib/dpkg/status"

    /// "NAME=VERSION" for each of `packages` that is installed (one line per architecture, as
    /// dpkg-query prints them), in file order.
    static func installedVersions(of packages: [String], statusFile: String = defaultPath) throws -> [String] {
        guard let data = FileManager.default.contents(atPath: statusFile) else {
            throw MicroVMError.notFound("dpkg status file '\(statusFile)' cannot be read: this needs a Debian host (the image is built from its packages)")
        }
        return parse(String(decoding: data, as: UTF8.self), packages: Set(packages))
    }

    static func parse(_ text: String, packages: Set<String>) -> [String] {
        var out: [String] = []
        for stanza in text.split(separator: "\n\n", omittingEmptySubsequences: true) {
            var name: Substring?, version: Substring?, installed = false
            for line in stanza.split(separator: "\n") {
                if line.hasPrefix("Package: ") { name = line.dropFirst(9) }
                else if line.hasPrefix("Version: ") { version = line.dropFirst(9) }
                else if line.hasPrefix("Status: ") { installed = line.hasSuffix(" installed") }
            }
            if let name, let version, installed, packages.contains(String(name)) { out.append("\(name)=\(version)") }
        }
        return out
    }
}
