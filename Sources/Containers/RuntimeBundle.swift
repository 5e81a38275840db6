import Foundation
import MicroVMCore
import Allocator

/// An OCI bundle as `mvm-runtime create` receives it from containerd's shim or Docker: the part
/// of `config.json` a micro-VM honours (the process's arguments, environment, working directory
/// and terminal; the root; `linux.resources`), read leniently where a runtime may add fields and
/// strictly where a field has the wrong type. Everything else (namespaces, mounts, seccomp,
/// capabilities) describes isolation the VM boundary replaces.
public struct RuntimeBundle: Sendable {
    public struct Config: Decodable, Sendable {
        public struct Process: Decodable, Sendable {
            public var terminal: Bool?
            public var args: [String]?
            public var env: [String]?
            public var cwd: String?
            public var user: User?
            public var rlimits: [Rlimit]?
        }
        public struct User: Decodable, Sendable {
            public var uid: UInt32?
            public var gid: UInt32?
        }
        public struct Rlimit: Decodable, Sendable {
            public var type: String
            public var hard: UInt64
            public var soft: UInt64
        }
        public struct Root: Decodable, Sendable {
            public var path: String
            public var readonly: Bool?
        }
        public struct Linux: Decodable, Sendable {
            public var resources: Resources?
        }
        public struct Resources: Decodable, Sendable {
            public var memory: OCIResources.Memory?
            public var cpu: OCIResources.CPU?
            public var pids: OCIResources.Pids?
        }
        public var ociVersion: String?
        public var process: Process?
        public var root: Root?
        public var hostname: String?
        public var linux: Linux?
    }

    public let directory: String
    public let config: Config

    /// Reads `DIRECTORY/config.json`; every problem is named as runc names it, with the field.
    public init(directory: String) throws {
        let file = directory + "/config.json"
        guard let data = FileManager.default.contents(atPath: file) else {
            throw MicroVMError.notFound("open \(file): no such file or directory: the bundle has no config.json")
        }
        config = try Self.decode(Config.self, from: data, named: "config.json")
        self.directory = directory
        guard let process = config.process, let args = process.args, !args.isEmpty, !args[0].isEmpty else {
            throw MicroVMError.invalidArgument("config.json: process.args must not be empty")
        }
        guard let root = config.root, !root.path.isEmpty else { throw MicroVMError.invalidArgument("config.json: root.path is required") }
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: rootfs, isDirectory: &isDir), isDir.boolValue else {
            throw MicroVMError.notFound("rootfs (\(rootfs)) does not exist: the bundle's root.path must be a directory")
        }
        if let bad = VMSpec.badEnvironmentEntry(process.env ?? []) {
            throw MicroVMError.invalidArgument("config.json: process.env has '\(bad)', which is not NAME=VALUE")
        }
        if let cwd = process.cwd, !cwd.isEmpty, !VMSpec.isWorkingDirectory(cwd) {
            throw MicroVMError.invalidArgument("config.json: process.cwd '\(cwd)' is not an absolute path")
        }
        try Self.checkRlimits(process.rlimits, in: "config.json")
    }

    /// The root directory, absolute.
    public var rootfs: String {
        let p = config.root?.path ?? ""
        return p.hasPrefix("/") ? p : directory + "/" + p
    }
    public var args: [String] { config.process?.args ?? [] }
    public var env: [String]? { config.process?.env }
    public var cwd: String? { config.process?.cwd.flatMap { $0.isEmpty || $0 == "/" ? nil : $0 } }
    public var terminal: Bool { config.process?.terminal ?? false }

    /// The slice `linux.resources` asks for: its memory limit (else `defaults`'), as many vCPUs as
    /// its CPU quota covers (else `defaults`'), the quota itself, and its shares as a weight.
    /// A limit no VM can have, or more than the host holds, is refused.
    public func slice(defaults: ResourceSlice, hostMemory: ByteCount, hostCPUs: Int) throws -> ResourceSlice {
        let (c, pids) = try Self.change(config.linux?.resources, hostMemory: hostMemory, hostCPUs: hostCPUs)
        var s = defaults
        if let m = c.memory { s.memory = m }
        if let n = c.cpus { s.cpus = n }
        if let q = c.quota { s.cpuQuota = q }
        if let w = c.weight { s.cpuWeight = w }
        if let pids { s.pidsLimit = pids }
        return s
    }

    /// What `resources` sets, as a change of slice (at `create` against the defaults, at `update`
    /// live) and a pids limit; unset and zero fields change nothing. A limit no VM can have, or
    /// more than the host holds, is refused.
    public static func change(_ r: Config.Resources?, hostMemory: ByteCount, hostCPUs: Int) throws -> (resize: Allocator.Resize, pids: Int?) {
        var c = Allocator.Resize()
        if let limit = r?.memory?.limit, limit > 0 {
            let bytes = ByteCount(UInt64(limit))
            guard bytes >= .mebibytes(64) else {
                throw MicroVMError.invalidArgument("linux.resources.memory.limit \(limit) is too small for a VM: give at least 64 MiB (67108864)")
            }
            guard bytes <= hostMemory else {
                throw MicroVMError.invalidArgument("linux.resources.memory.limit \(limit) is more than this host's \(hostMemory) of memory")
            }
            c.memory = bytes
        }
        if let quota = r?.cpu?.quota, quota > 0 {
            let period = Double(r?.cpu?.period ?? 100_000)
            guard period > 0 else { throw MicroVMError.invalidArgument("linux.resources.cpu.period must be positive") }
            let cpus = Double(quota) / period
            guard cpus <= Double(hostCPUs) else {
                throw MicroVMError.invalidArgument("linux.resources.cpu quota \(quota)/\(Int(period)) asks for \(cpus) CPUs; this host has \(hostCPUs)")
            }
            c.cpus = max(1, Int(cpus.rounded(.up)))
            c.quota = cpus
        }
        // cgroup v1's range of shares (2...262144): a larger value must not overflow the weight.
        if let shares = r?.cpu?.shares, shares > 0 { c.weight = max(1, min(10_000, Int(min(shares, 262_144)) * 100 / 1024)) }
        let pids = r?.pids.flatMap { $0.limit > 0 ? Int(clamping: $0.limit) : nil }
        return (c, pids)
    }

    /// The instance that runs this bundle's process: `name`, the slice `linux.resources` asks
    /// for (the configuration's default profile where it is silent), the process's arguments,
    /// environment and working directory, the bundle's root as a tree and as the disk `disk`,
    /// and a balloon.
    /// With `agentCID`, the VM gets that vsock context id and the guest agent, which runs the
    /// process (`VMSpec.agentRunsCommand`) and `exec`'s.
    public func spec(name: String, config: MicroVMConfig, host: HostCapacity, disk: String, agentCID: UInt32? = nil) throws -> VMSpec {
        let slice = try self.slice(defaults: try config.profile(named: config.defaults.profile).slice(),
                                   hostMemory: host.memoryTotal, hostCPUs: host.onlineCPUs.count)
        var spec = VMSpec(name: name, cpus: slice.cpus, memory: slice.memory, command: args, rootfs: rootfs, slice: slice, timeout: Self.noTimeout)
        spec.rootfsDisk = disk
        // A balloon with free page reporting: what the container's process frees goes back to the
        // host, and `update --memory` resizes the VM live.
        spec.balloon = BalloonSpec()
        spec.environment = env
        spec.workingDirectory = cwd
        spec.vsockCID = agentCID
        spec.vsockShell = agentCID != nil
        // With the agent, the supervisor runs the process through it: output streams as it
        // comes, and `kill`'s signals reach the process itself.
        spec.agentRunsCommand = agentCID != nil ? true : nil
        return spec
    }

    /// A container runs until its process ends or it is killed: the launch's time-out is ten years.
    public static let noTimeout: Double = 10 * 365 * 86_400

    /// The resource numbers of `process.rlimits`' types, as Linux numbers them.
    public static let rlimitTypes: [String: Int32] = [
        "RLIMIT_CPU": 0, "RLIMIT_FSIZE": 1, "RLIMIT_DATA": 2, "RLIMIT_STACK": 3, "RLIMIT_CORE": 4, "RLIMIT_RSS": 5,
        "RLIMIT_NPROC": 6, "RLIMIT_NOFILE": 7, "RLIMIT_MEMLOCK": 8, "RLIMIT_AS": 9, "RLIMIT_LOCKS": 10, "RLIMIT_SIGPENDING": 11,
        "RLIMIT_MSGQUEUE": 12, "RLIMIT_NICE": 13, "RLIMIT_RTPRIO": 14, "RLIMIT_RTTIME": 15,
    ]

    /// `process.rlimits` checked as runc checks them: a known type, soft at most hard.
    static func checkRlimits(_ limits: [Config.Rlimit]?, in source: String) throws {
        for l in limits ?? [] {
            guard rlimitTypes[l.type] != nil else { throw MicroVMError.invalidArgument("\(source): process.rlimits has an unknown type \(l.type)") }
            guard l.soft <= l.hard else {
                throw MicroVMError.invalidArgument("\(source): process.rlimits \(l.type) has a soft limit \(l.soft) above its hard limit \(l.hard)")
            }
        }
    }

    /// A process as `runc exec --process FILE` reads it (containerd's shim writes one for `ctr task
    /// exec`, Docker for `docker exec`), checked as `config.json`'s process is.
    public static func process(from data: Data, named source: String) throws -> Config.Process {
        let process = try decode(Config.Process.self, from: data, named: source)
        guard let args = process.args, !args.isEmpty, !args[0].isEmpty else {
            throw MicroVMError.invalidArgument("\(source): args must not be empty")
        }
        if let bad = VMSpec.badEnvironmentEntry(process.env ?? []) {
            throw MicroVMError.invalidArgument("\(source): env has '\(bad)', which is not NAME=VALUE")
        }
        if let cwd = process.cwd, !cwd.isEmpty, !VMSpec.isWorkingDirectory(cwd) {
            throw MicroVMError.invalidArgument("\(source): cwd '\(cwd)' is not an absolute path")
        }
        try checkRlimits(process.rlimits, in: source)
        return process
    }

    /// `linux.resources` as `runc update --resources` reads it (from containerd's shim, or
    /// `docker update` through it), its problems named with the field.
    public static func resources(from data: Data, named source: String) throws -> Config.Resources {
        try decode(Config.Resources.self, from: data, named: source)
    }

    /// Decodes `data`; a field of the wrong type, or a missing one, is named as runc names it.
    static func decode<T: Decodable>(_ type: T.Type, from data: Data, named source: String) throws -> T {
        do {
            return try JSONDecoder().decode(T.self, from: data)
        } catch let DecodingError.typeMismatch(type, context), let DecodingError.valueNotFound(type, context) {
            let found = context.debugDescription.range(of: "found ").map { " (" + context.debugDescription[$0.lowerBound...].trimmingCharacters(in: CharacterSet(charactersIn: ". ")) + ")" } ?? ""
            throw MicroVMError.invalidArgument("\(source): \(Self.path(context.codingPath)) must be \(Self.describe(type))\(found)")
        } catch let DecodingError.keyNotFound(key, context) {
            throw MicroVMError.invalidArgument("\(source): \(Self.path(context.codingPath + [key])) is required")
        } catch {
            throw MicroVMError.invalidArgument("\(source) is not valid JSON: \(error)")
        }
    }

    static func path(_ keys: [any CodingKey]) -> String {
        keys.map { $0.intValue.map { "[\($0)]" } ?? "." + $0.stringValue }.joined().trimmingCharacters(in: CharacterSet(charactersIn: "."))
    }

    static func describe(_ type: Any.Type) -> String {
        switch type {
        case is String.Type: return "a string"
        case is Bool.Type: return "a boolean"
        case is [String].Type, is [Any].Type: return "an array"
        case is [String: Any].Type: return "an object"
        case is Int.Type, is Int64.Type, is UInt64.Type, is UInt32.Type: return "an integer"
        default: return "\(type)"
        }
    }
}
