import Foundation
import MicroVMCore
import Images

/// The rig's initramfs, cached under `Paths.cache/rig/KEY/`: static busybox, the rig init and the
/// modules that make the L2 a KVM host with 9p (kvm_amd and its dependencies, virtio-pci, 9p).
/// KEY hashes every input, so a new kernel or init builds a new image and an unchanged one is reused.
public struct RigImage: Sendable, Equatable {
    public var key: String
    public var directory: String
    public var kernel: DebianKernel
    public var initrd: String { directory + "/initrd.img" }

    /// Modules the rig loads, by name; dependencies come from the kernel's modules.dep.
    public static let moduleNames = ["irqbypass", "kvm", "ccp", "kvm_amd", "virtio_pci", "9pnet_virtio", "9p", "netfs", "fscache"]
    /// Bumped when the recipe changes in a way the hashed inputs do not show.
    static let recipeVersion = "mvm-rig-1"

    /// Where images/rig/init lives (the repository, or MVM_SOURCE_DIR).
    public static func initScript(sourceDirectory: String = Paths.sourceDirectory()) -> String {
        sourceDirectory + "/images/rig/init"
    }

    /// Returns the cached image for the current inputs, building it (once, under a lock) if needed.
    public static func ensure(paths: Paths = .default, sourceDirectory: String = Paths.sourceDirectory(),
                              busybox: String = "/bin/busybox") throws -> RigImage {
        let kernel = try DebianKernel.newest()
        let script = initScript(sourceDirectory: sourceDirectory)
        let key = try inputKey(kernel: kernel, initScript: script, busybox: busybox)
        let root = paths.cache + "/rig"
        let image = RigImage(key: key, directory: root + "/" + key, kernel: kernel)
        if FileManager.default.fileExists(atPath: image.initrd) { return image }
        try Paths.ensureDirectory(root)
        return try withLock(root + "/.lock") {
            if FileManager.default.fileExists(atPath: image.initrd) { return image }
            try build(image, root: root, initScript: script, busybox: busybox)
            return image
        }
    }

    static func inputKey(kernel: DebianKernel, initScript: String, busybox: String) throws -> String {
        guard let initData = FileManager.default.contents(atPath: initScript) else {
            throw MicroVMError.notFound("rig init '\(initScript)' is missing: set MVM_SOURCE_DIR to the MicroVM source tree")
        }
        let fm = FileManager.default
        func stamp(_ p: String) -> String {
            let a = try? fm.attributesOfItem(atPath: p)
            return "size=\(a?[.size] as? UInt64 ?? 0) mtime=\((a?[.modificationDate] as? Date)?.timeIntervalSince1970 ?? 0)"
        }
        let description = [
            "recipe=\(recipeVersion)",
            "kernel=\(kernel.version) \(stamp(kernel.bzImage))",
            "modules.dep \(stamp(kernel.modulesDirectory + "/modules.dep"))",
            "modules=\(moduleNames.joined(separator: ","))",
            "busybox \(stamp(busybox))",
        ].joined(separator: "\n") + "\n"
        let digest = try ProcessRunner.check(["sha256sum"], input: Data(description.utf8) + initData, timeout: 30, package: "coreutils").stdoutText
        return "\(kernel.version)-" + String(digest.prefix(16))
    }

    private static func build(_ image: RigImage, root: String, initScript: String, busybox: String) throws {
        let fm = FileManager.default
        // Under the lock, any leftover build directory belongs to a builder that died.
        for name in (try? fm.contentsOfDirectory(atPath: root)) ?? [] where name.hasPrefix(".build-") {
            try? fm.removeItem(atPath: root + "/" + name)
        }
        let tmp = root + "/.build-\(image.key)-\(getpid())"
        try Paths.ensureDirectory(tmp)
        do {
            try InitramfsBuilder(kernel: image.kernel, initScript: initScript, moduleNames: moduleNames, busybox: busybox)
                .build(to: tmp + "/initrd.img")
            if fm.fileExists(atPath: image.directory) { try fm.removeItem(atPath: image.directory) }
            try fm.moveItem(atPath: tmp, toPath: image.directory)
        } catch {
            try? fm.removeItem(atPath: tmp)
            throw error
        }
    }

    private static func withLock<T>(_ lockPath: String, _ body: () throws -> T) throws -> T {
        try Paths.withLockFile(lockPath, body)
    }
}
