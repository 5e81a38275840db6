import Foundation
import Yams

/// A named instance size from config/microvm.yaml (`tiny`, `small`, `bench`, …).
public struct Profile: Codable, Sendable, Hashable {
    public var cpus: Int
    public var memory: ByteCount
    public var placement: Placement
    public var cpuWeight: Int?
    public var cpuQuota: Double?
    public var pidsLimit: Int?
    public var hugePages: Bool?

    public func slice() -> ResourceSlice {
        ResourceSlice(cpus: cpus, placement: placement, cpuWeight: cpuWeight ?? 100, cpuQuota: cpuQuota,
                      memory: memory, hugePages: hugePages ?? false, pidsLimit: pidsLimit)
    }
}

/// CPUs and RAM kept back for the host and the VMM threads.
public struct HostReservation: Codable, Sendable, Hashable {
    public var cpus: Int
    public var memory: ByteCount
    /// Memory overcommit ratio allowed for shared placements (1.0 = none).
    public var memoryOvercommit: Double?
    /// Which CPUs to reserve ("6-7"); nil reserves the highest-numbered `cpus` CPUs.
    public var cpuList: String?
}

/// The parsed configuration file.
public struct MicroVMConfig: Codable, Sendable {
    public var reservation: HostReservation
    public var profiles: [String: Profile]
    public var defaults: Defaults

    public struct Defaults: Codable, Sendable {
        public var profile: String
        public var connect: String?
        public var runtime: String?
    }

    /// Reads YAML; an unknown key, a bad size or a bad placement is an error naming the key.
    public static func parse(_ yaml: String, source: String = "config") throws -> MicroVMConfig {
        do {
            let cfg = try YAMLDecoder().decode(MicroVMConfig.self, from: yaml)
            try cfg.check(source: source)
            return cfg
        } catch let e as MicroVMError {
            throw e
        } catch let DecodingError.keyNotFound(key, ctx) {
            throw MicroVMError.invalidArgument("\(source): missing key '\((ctx.codingPath + [key]).map(\.stringValue).joined(separator: "."))'")
        } catch let DecodingError.typeMismatch(_, ctx), let DecodingError.valueNotFound(_, ctx), let DecodingError.dataCorrupted(ctx) {
            let path = ctx.codingPath.map(\.stringValue).joined(separator: ".")
            throw MicroVMError.invalidArgument("\(source): bad value at '\(path)': \(ctx.underlyingError.map { "\($0)" } ?? ctx.debugDescription)")
        } catch {
            throw MicroVMError(.invalidArgument, "\(source) is not valid YAML", cause: error)
        }
    }

    /// Loads MVM_CONFIG, else config/microvm.yaml from the source tree, else /etc/microvm/microvm.yaml.
    public static func load(path: String? = nil) throws -> MicroVMConfig {
        let env = ProcessInfo.processInfo.environment
        let candidates = [path, env["MVM_CONFIG"], Paths.sourceDirectory() + "/config/microvm.yaml", "/etc/microvm/microvm.yaml"].compactMap { $0 }
        for c in candidates where FileManager.default.fileExists(atPath: c) {
            let cache = ParsedConfigCache(file: c)
            if let cfg = cache.lookup() { return cfg }
            let cfg = try parse(try String(contentsOfFile: c, encoding: .utf8), source: c)
            cache.remember(cfg)
            return cfg
        }
        if let path { throw MicroVMError.notFound("config file '\(path)' does not exist") }
        return try parse(builtinDefault, source: "built-in config")
    }

    public func profile(named name: String) throws -> Profile {
        guard let p = profiles[name] else {
            throw MicroVMError.invalidArgument("unknown profile '\(name)': choose one of \(profiles.keys.sorted().joined(separator: ", ")) (config/microvm.yaml)")
        }
        return p
    }

    private func check(source: String) throws {
        guard reservation.cpus >= 0 else { throw MicroVMError.invalidArgument("\(source): reservation.cpus must not be negative") }
        for (name, p) in profiles {
            guard p.cpus >= 1 else { throw MicroVMError.invalidArgument("\(source): profile '\(name)' needs cpus >= 1") }
            guard p.memory >= .mebibytes(16) else { throw MicroVMError.invalidArgument("\(source): profile '\(name)' needs memory >= 16M") }
        }
        guard profiles[defaults.profile] != nil else {
            throw MicroVMError.invalidArgument("\(source): defaults.profile '\(defaults.profile)' is not a profile")
        }
    }

    public static let builtinDefault = """
    reservation: {cpus: 0, memory: 1G, memoryOvercommit: 1.0}
    defaults: {profile: small}
    profiles:
      tiny: {cpus: 1, memory: 128M, placement: shared}
      small: {cpus: 1, memory: 256M, placement: shared}
      bench: {cpus: 1, memory: 512M, placement: pinned, pidsLimit: 1024}
    """
}

/// The parsed configuration, kept as JSON beside the image cache while the YAML file is unchanged
/// (same inode, size and modification time): decoding YAML costs a launch milliseconds, JSON
/// a fraction of one. Best effort both ways: a cache that cannot be read or written costs a parse.
struct ParsedConfigCache {
    var file: String
    var path: String = Paths.default.cache + "/config-cache.json"

    struct Entry: Codable { var stamp: String; var config: MicroVMConfig }

    var stamp: String? { FileStamp.of(file) }

    func lookup() -> MicroVMConfig? {
        guard let stamp, let data = FileManager.default.contents(atPath: path),
              let e = try? JSONDecoder().decode(Entry.self, from: data), e.stamp == stamp else { return nil }
        return e.config
    }

    func remember(_ config: MicroVMConfig) {
        guard let stamp, FileManager.default.fileExists(atPath: (path as NSString).deletingLastPathComponent),
              let data = try? JSONEncoder().encode(Entry(stamp: stamp, config: config)) else { return }
        try? data.write(to: URL(fileURLWithPath: path), options: .atomic)
    }
}

/// A file's identity and version without reading it: path, inode, size and modification time.
/// Caches keyed by it (the parsed config, the image key) stay valid until the file is replaced
/// or rewritten.
public enum FileStamp {
    public static func of(_ path: String) -> String? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return "\(path) \(st.st_ino) \(st.st_size) \(st.st_mtim.tv_sec).\(st.st_mtim.tv_nsec)"
    }
}
