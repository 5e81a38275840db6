#if canImport(Glibc)
import Glibc
#endif

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

    public func profile(named name: String) throws -> Profile {
        guard let p = profiles[name] else {
            throw MicroVMError.invalidArgument("unknown profile '\(name)': choose one of \(profiles.keys.sorted().joined(separator: ", ")) (config/microvm.yaml)")
        }
        return p
    }

    /// A parsed file's consistency: an error names the file (`source`) and the key.
    public func check(source: String) throws {
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
