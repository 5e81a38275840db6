import Foundation
import MicroVMCore
@testable import Images

/// Shared helpers: the default image is built once into the shared cache and reused.
enum Fixture {
    static let haveKernel = (try? DebianKernel.newest()) != nil
    static let haveBusybox = ProcessRunner.which("busybox") != nil
    static let haveQEMU = ProcessRunner.which("qemu-system-x86_64") != nil
    static let haveGuestfs = FileManager.default.fileExists(atPath: "/usr/bin/guestfish")
    static let canBuild = haveKernel && haveBusybox && ProcessRunner.which("mke2fs") != nil

    static var repoRoot: String { Paths.sourceDirectory() }
    static var initScript: String { repoRoot + "/images/init" }

    /// A store over a throwaway state dir and the shared image cache.
    static func store() -> ImageStore {
        let state = NSTemporaryDirectory() + "mvm-images-test-state"
        return ImageStore(paths: Paths(state: state, cache: Paths.default.cache))
    }

    static func image() throws -> GuestImage { try store().ensureDefault() }

    static func tempDir(_ tag: String) throws -> String {
        let dir = NSTemporaryDirectory() + "mvm-images-\(tag)-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    /// Boots the image under QEMU TCG and parses the console.
    static func bootQEMU(_ image: GuestImage, command: [String], disk: String?, extra: String = "",
                         kernel: String? = nil) throws -> (ConsoleParser, String) {
        var argv = ["qemu-system-x86_64", "-M", "pc", "-accel", "tcg", "-m", "256", "-nographic", "-no-reboot",
                    "-nodefaults", "-serial", "stdio", "-kernel", kernel ?? image.kernel, "-initrd", image.initrd,
                    "-append", KernelCommandLine.build(command: command, extra: extra)]
        if let disk {
            // snapshot=on: guest writes go to a temporary overlay, so the cached disk stays pristine.
            argv += ["-drive", "file=\(disk),format=raw,if=virtio,snapshot=on"]
        }
        let out = try ProcessRunner.run(argv, timeout: 240, package: "qemu-system-x86")
        let console = out.stdoutText
        if out.timedOut { throw MicroVMError(.timeout, "QEMU did not power off within 240 s; console:\n\(console.suffix(3000))") }
        return (ConsoleParser.parse(console), console)
    }
}
