import Foundation
import MicroVMCore

/// What went into an initramfs: the kernel version and the modules in the order the init loads them.
public struct InitramfsManifest: Sendable, Equatable, Codable {
    public var kernelVersion: String
    public var modules: [KernelModule]
    /// Where the load order lives inside the initramfs (one path under /lib/modules per line).
    public static let orderPath = "etc/modules.order"
}

/// Builds the gzip'd newc initramfs: static busybox with its applet links, the guest init and
/// the kernel modules with their dependencies, uncompressed for busybox insmod, and the guest
/// agent (`mvm-agent`, compiled statically from images/agent) that `mvm exec` talks to.
///
/// ```swift
/// let m = try InitramfsBuilder(kernel: try .newest(), initScript: "images/init")
///     .build(to: "/tmp/initrd.img")
/// print(m.modules.map(\.name))
/// ```
public struct InitramfsBuilder: Sendable {
    public var kernel: DebianKernel
    public var initScript: String
    public var moduleNames: [String]
    public var busybox: String
    /// The agent's C source; nil leaves the agent out (the rig's own initramfs).
    public var agentSource: String?

    /// Where the agent lands in the initramfs, outside any root the guest mounts.
    public static let agentPath = "bin/mvm-agent"

    public init(kernel: DebianKernel, initScript: String, moduleNames: [String] = ModuleResolver.defaultModules,
                busybox: String = "/bin/busybox", agentSource: String? = nil) {
        self.kernel = kernel
        self.initScript = initScript
        self.moduleNames = moduleNames
        self.busybox = busybox
        self.agentSource = agentSource
    }

    @discardableResult
    public func build(to output: String) throws -> InitramfsManifest {
        let resolver = try ModuleResolver(directory: kernel.modulesDirectory)
        let modules = try resolver.resolve(moduleNames)
        guard let initData = FileManager.default.contents(atPath: initScript) else {
            throw MicroVMError.notFound("guest init '\(initScript)' is missing: set MVM_SOURCE_DIR to the MicroVM source tree")
        }
        let bb = try Busybox.staticBinary(busybox)

        var a = CpioArchive()
        for d in ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "run", "tmp", "root", "newroot", "lib", "lib/modules"] {
            a.directory(d)
        }
        // The kernel opens /dev/console before devtmpfs exists; without the node the init has no stdout.
        a.characterDevice("dev/console", major: 5, minor: 1)
        a.characterDevice("dev/null", major: 1, minor: 3, mode: 0o666)
        a.characterDevice("dev/ttyS0", major: 4, minor: 64)
        a.file("bin/busybox", contents: bb.data, mode: 0o755)
        for link in bb.applets where link != "bin/busybox" {
            a.symlink(link, target: "/bin/busybox")
        }
        a.file("init", contents: initData, mode: 0o755)
        if let agentSource {
            let scratch = FileManager.default.temporaryDirectory.path + "/mvm-agent-\(getpid())-\(UInt32.random(in: 0 ... .max))"
            defer { try? FileManager.default.removeItem(atPath: scratch) }
            try RootfsBuilder.compileStatic(source: agentSource, output: scratch, what: "guest agent")
            guard let agent = FileManager.default.contents(atPath: scratch) else { throw MicroVMError.notFound("the compiled guest agent '\(scratch)' is missing") }
            a.file(Self.agentPath, contents: agent, mode: 0o755)
        }

        var dirs: Set<String> = ["lib/modules"]
        for m in modules {
            var parent = "lib/modules"
            for comp in m.initramfsPath.split(separator: "/").dropLast() {
                parent += "/" + comp
                if dirs.insert(parent).inserted { a.directory(parent) }
            }
            a.file("lib/modules/" + m.initramfsPath, contents: try resolver.contents(of: m))
        }
        a.file(InitramfsManifest.orderPath, contents: Data((modules.map(\.initramfsPath).joined(separator: "\n") + "\n").utf8))

        let gz = try ProcessRunner.check(["gzip", "-9n"], input: a.finish(), timeout: 300, package: "gzip")
        try gz.stdout.write(to: URL(fileURLWithPath: output))
        return InitramfsManifest(kernelVersion: kernel.version, modules: modules)
    }

    /// Reads an initramfs back: gunzips it and parses the cpio.
    public static func read(_ path: String) throws -> [CpioArchive.Entry] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw MicroVMError.notFound("cannot read initramfs '\(path)'")
        }
        let raw = try ProcessRunner.check(["gzip", "-dc"], input: data, timeout: 120, package: "gzip").stdout
        return try CpioArchive.read(raw)
    }
}

/// The static busybox both images carry, and the applet links it wants.
enum Busybox {
    struct Binary { var data: Data; var applets: [String] }

    static func staticBinary(_ path: String) throws -> Binary {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw MicroVMError.notFound("'\(path)' is missing: run 'apt-get install busybox-static'")
        }
        // A dynamic busybox would need its libraries in the initramfs, which has none.
        if data.range(of: Data("/lib64/ld-linux".utf8)) != nil {
            throw MicroVMError(.unsupported, "'\(path)' is dynamically linked: run 'apt-get install busybox-static' (it replaces the dynamic busybox)")
        }
        let list = try ProcessRunner.check([path, "--list-full"], timeout: 30)
        let applets = list.stdoutText.split(separator: "\n").map(String.init).filter { !$0.isEmpty && !$0.hasPrefix("/") && !$0.contains("..") }
        return Binary(data: data, applets: applets)
    }
}
