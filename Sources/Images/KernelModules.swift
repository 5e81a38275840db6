import Foundation
import MicroVMCore

/// One kernel module chosen for the initramfs.
public struct KernelModule: Sendable, Equatable, Codable {
    /// Module name as the kernel knows it (dashes turned into underscores).
    public var name: String
    /// Path relative to /lib/modules/VERSION as modules.dep gives it (may end in .xz or .zst).
    public var sourcePath: String
    /// Path relative to /lib/modules inside the initramfs: always an uncompressed .ko,
    /// because busybox insmod cannot decompress.
    public var initramfsPath: String
}

/// Resolves module names to files and orders them so every module follows its dependencies,
/// from one kernel version's modules.dep, modules.softdep and modules.alias.
///
/// ```swift
/// let r = try ModuleResolver(directory: "/lib/modules/6.1.0-56-amd64")
/// let order = try r.resolve(["virtio_blk", "ext4"])   // virtio, virtio_ring, …, ext4
/// ```
public struct ModuleResolver: Sendable {
    public let directory: String
    /// name → path, and path → its dependencies' paths, exactly as modules.dep says.
    public private(set) var pathByName: [String: String] = [:]
    public private(set) var depsByPath: [String: [String]] = [:]
    private var softPre: [String: [String]] = [:]
    private var aliases: [String: [String]] = [:]
    private var builtin: Set<String> = []

    /// The modules every MicroVM guest needs: virtio transports and devices (the balloon too), vsock, ext4 and 9p.
    public static let defaultModules = [
        "virtio_mmio", "virtio_pci", "virtio_blk", "virtio_net", "virtio_rng", "virtio_balloon",
        "vmw_vsock_virtio_transport", "ext4", "9p", "9pnet_virtio", "netfs", "fscache",
    ]

    public init(directory: String) throws {
        self.directory = directory
        let depFile = directory + "/modules.dep"
        guard let dep = try? String(contentsOfFile: depFile, encoding: .utf8) else {
            throw MicroVMError.notFound("cannot read '\(depFile)': install the kernel's modules (apt-get install linux-image-amd64) or run depmod")
        }
        for line in dep.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let path = String(line[..<colon])
            depsByPath[path] = line[line.index(after: colon)...].split(separator: " ").map(String.init)
            pathByName[Self.name(ofPath: path)] = path
        }
        if let soft = try? String(contentsOfFile: directory + "/modules.softdep", encoding: .utf8) {
            for line in soft.split(separator: "\n") {
                let w = line.split(separator: " ").map(String.init)
                guard w.count >= 3, w[0] == "softdep" else { continue }
                var pre: [String] = []
                var inPre = false
                for word in w.dropFirst(2) {
                    if word == "pre:" { inPre = true } else if word == "post:" { inPre = false } else if inPre { pre.append(word) }
                }
                softPre[Self.normalize(w[1]), default: []] += pre
            }
        }
        if let alias = try? String(contentsOfFile: directory + "/modules.alias", encoding: .utf8) {
            for line in alias.split(separator: "\n") where line.hasPrefix("alias ") {
                let w = line.split(separator: " ")
                guard w.count == 3, !w[1].contains("*") else { continue }
                aliases[String(w[1]), default: []].append(Self.normalize(String(w[2])))
            }
        }
        if let b = try? String(contentsOfFile: directory + "/modules.builtin", encoding: .utf8) {
            builtin = Set(b.split(separator: "\n").map { Self.name(ofPath: String($0)) })
        }
    }

    /// "kernel/drivers/char/hw_random/virtio-rng.ko.xz" → "virtio_rng".
    public static func name(ofPath path: String) -> String {
        var base = String(path.split(separator: "/").last ?? "")
        for suffix in [".xz", ".zst", ".gz"] where base.hasSuffix(suffix) { base.removeLast(suffix.count) }
        if base.hasSuffix(".ko") { base.removeLast(3) }
        return normalize(base)
    }

    static func normalize(_ name: String) -> String { name.replacingOccurrences(of: "-", with: "_") }

    /// Every module needed for `names`, dependencies first. Soft "pre" dependencies (ext4 wants
    /// crc32c) are included too; an alias with several providers takes the generic one, which
    /// loads on any CPU. Names built into the kernel are skipped.
    public func resolve(_ names: [String]) throws -> [KernelModule] {
        var order: [String] = []
        var seen: Set<String> = []
        func visit(path: String, depth: Int) throws {
            guard !seen.contains(path) else { return }
            guard depth < 64 else { throw MicroVMError(.invalidImage, "module dependency loop at '\(path)' in \(directory)/modules.dep: run depmod") }
            seen.insert(path)
            for pre in softPre[Self.name(ofPath: path)] ?? [] {
                if let p = softProvider(pre) { try visit(path: p, depth: depth + 1) }
            }
            guard let deps = depsByPath[path] else {
                throw MicroVMError.notFound("module file '\(path)' is listed as a dependency but missing from \(directory)/modules.dep: run depmod for this kernel")
            }
            // modules.dep lists the full closure with the deepest dependency last.
            for d in deps.reversed() { try visit(path: d, depth: depth + 1) }
            order.append(path)
        }
        for raw in names {
            let n = Self.normalize(raw)
            if let path = pathByName[n] {
                try visit(path: path, depth: 0)
            } else if builtin.contains(n) {
                continue
            } else {
                throw MicroVMError.notFound("kernel module '\(raw)' is not in \(directory)/modules.dep (nor built in): this kernel lacks it; install a kernel that has it or drop it from the module list")
            }
        }
        return order.map { p in
            var out = p
            for suffix in [".xz", ".zst", ".gz"] where out.hasSuffix(suffix) { out.removeLast(suffix.count) }
            return KernelModule(name: Self.name(ofPath: p), sourcePath: p, initramfsPath: out)
        }
    }

    private func softProvider(_ name: String) -> String? {
        if let p = pathByName[Self.normalize(name)] { return p }
        let providers = (aliases[name] ?? []).filter { pathByName[$0] != nil }
        let pick = providers.first { $0.hasSuffix("_generic") } ?? providers.first
        return pick.flatMap { pathByName[$0] }
    }

    /// The module file's bytes, decompressed (busybox insmod takes only plain ELF objects).
    public func contents(of module: KernelModule) throws -> Data {
        let full = directory + "/" + module.sourcePath
        guard let data = FileManager.default.contents(atPath: full) else {
            throw MicroVMError.notFound("module file '\(full)' is missing: reinstall the kernel package or run depmod")
        }
        let argv: [String]? = full.hasSuffix(".xz") ? ["xz", "-dc"] : full.hasSuffix(".zst") ? ["zstd", "-dcq"] : full.hasSuffix(".gz") ? ["gzip", "-dc"] : nil
        guard let argv else { return data }
        let out = try ProcessRunner.check(argv, input: data, timeout: 120, package: full.hasSuffix(".zst") ? "zstd" : "xz-utils")
        return out.stdout
    }
}
