import Foundation
import MicroVMCore
import Host

/// A cgroup enforcing one `ResourceSlice`: the same directory in every v1 hierarchy that carries
/// a controller we use (cpuset, cpu, memory, pids), or one directory under the v2 unified mount.
/// On a hybrid host (v1 controllers plus an empty v2 mount) the v1 hierarchies are used.
public struct CgroupSet: Sendable {
    /// "microvm/<instance>", relative to each hierarchy's root.
    public let name: String
    public let mode: CgroupMode
    /// Controller ("cpuset", "cpu", "memory", "pids"; "unified" on v2) → this cgroup's directory.
    public let directories: [String: String]
    /// Controller → the hierarchy's mount point, where remove() moves leftover tasks.
    let mounts: [String: String]

    public static let controllers = ["cpuset", "cpu", "memory", "pids"]
    static let period = Enforcement.period

    /// Creates (or takes over a leftover of) the cgroup `name` and writes the slice's limits.
    /// A failure removes what was created and names the file that refused the value.
    public static func create(name: String, slice: ResourceSlice, roots: HostRoots = HostRoots(), mode: CgroupMode? = nil) throws -> CgroupSet {
        let set = try existing(name: name, roots: roots, mode: mode)
        do {
            try set.build(slice: slice, parts: name.split(separator: "/").map(String.init))
        } catch {
            try? set.remove()
            throw error
        }
        return set
    }

    /// The cgroup `name` as it is (or would be) on this host, nothing written: e.g. to remove one
    /// that a process which died left behind.
    public static func existing(name: String, roots: HostRoots = HostRoots(), mode: CgroupMode? = nil) throws -> CgroupSet {
        let parts = name.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        guard !parts.isEmpty, !name.hasPrefix("/"), parts.allSatisfy({ $0 != "." && $0 != ".." && !$0.isEmpty }) else {
            throw MicroVMError.invalidArgument("cgroup name '\(name)' must be a relative path like microvm/NAME, without '.' or '..'")
        }
        let mountsText = readWholeText(roots.proc + "/self/mounts") ?? ""
        let mode = mode ?? HostProfile.detectCgroupMode(mounts: mountsText)
        let mounts = try mountPoints(mountsText, mode: mode)
        var dirs: [String: String] = [:]
        for (controller, mount) in mounts { dirs[controller] = mount + "/" + name }
        return CgroupSet(name: name, mode: mode, directories: dirs, mounts: mounts)
    }

    /// Controller → mount point, from /proc/self/mounts.
    static func mountPoints(_ mounts: String, mode: CgroupMode) throws -> [String: String] {
        var out: [String: String] = [:]
        for line in mounts.split(separator: "\n") {
            let f = line.split(separator: " ").map(String.init)
            guard f.count >= 4 else { continue }
            let point = f[1].replacingOccurrences(of: "\\040", with: " ")
            if mode == .v2, f[2] == "cgroup2" { out["unified"] = point }
            if mode != .v2, f[2] == "cgroup" {
                let options = Set(f[3].split(separator: ",").map(String.init))
                for c in controllers where options.contains(c) && out[c] == nil { out[c] = point }
            }
        }
        switch mode {
        case .none:
            throw MicroVMError.unsupported("no cgroup filesystem is mounted: mount cgroup v2 at /sys/fs/cgroup (or the v1 controllers) to enforce slices")
        case .v2:
            guard out["unified"] != nil else { throw MicroVMError.unsupported("no cgroup2 mount found in /proc/self/mounts") }
        case .v1, .hybrid:
            let missing = controllers.filter { out[$0] == nil }
            guard missing.isEmpty else {
                throw MicroVMError.unsupported("cgroup v1 controllers \(missing.joined(separator: ", ")) are not mounted: mount them under /sys/fs/cgroup to enforce slices")
            }
        }
        return out
    }

    private func build(slice: ResourceSlice, parts: [String]) throws {
        if mode == .v2 {
            guard let mount = mounts["unified"] else { return }
            let available = Set(((try? read(mount + "/cgroup.controllers")) ?? "").split(separator: " ").map(String.init))
            let wanted = Self.controllers.filter(available.contains)
            var dir = mount
            for part in parts {
                // Each ancestor must delegate the controllers to its children.
                try write(dir + "/cgroup.subtree_control", wanted.map { "+" + $0 }.joined(separator: " "))
                dir += "/" + part
                try makeDirectory(dir)
            }
            if wanted.contains("cpuset") {
                try write(dir + "/cpuset.cpus", slice.cpuSetList)
                if let node = slice.numaNode { try write(dir + "/cpuset.mems", "\(node)") }
            }
            if wanted.contains("cpu") {
                for (file, value) in Self.cpuFiles(dir, unified: true, slice: slice) { try write(file, value) }
            }
            if wanted.contains("memory") {
                try write(dir + "/memory.max", "\(slice.memory.bytes)")
                if exists(dir + "/memory.swap.max") { try write(dir + "/memory.swap.max", "0") }
            }
            if wanted.contains("pids") { try write(dir + "/pids.max", slice.pidsLimit.map(String.init) ?? "max") }
            return
        }
        for (controller, mount) in mounts.sorted(by: { $0.key < $1.key }) {
            var dir = mount
            for (i, part) in parts.enumerated() {
                let parent = dir
                dir += "/" + part
                try makeDirectory(dir)
                if controller == "cpuset" {
                    // A new v1 cpuset starts empty and takes no tasks until cpus and mems are set.
                    let leaf = i == parts.count - 1
                    let parentCPUs = try read(parent + "/cpuset.cpus")
                    let parentMems = try read(parent + "/cpuset.mems")
                    if leaf {
                        try write(dir + "/cpuset.mems", slice.numaNode.map(String.init) ?? parentMems)
                        try write(dir + "/cpuset.cpus", slice.cpuSet.isEmpty ? parentCPUs : slice.cpuSetList)
                    } else {
                        let have = Set((try? CPUList.parse(try read(dir + "/cpuset.cpus"))) ?? [])
                        if have.isEmpty || !Set(slice.cpuSet).isSubset(of: have) { try write(dir + "/cpuset.cpus", parentCPUs) }
                        if try read(dir + "/cpuset.mems").isEmpty { try write(dir + "/cpuset.mems", parentMems) }
                    }
                }
            }
        }
        guard let cpu = directories["cpu"], let memory = directories["memory"], let pids = directories["pids"] else { return }
        for (file, value) in Self.cpuFiles(cpu, unified: false, slice: slice) { try write(file, value) }
        try write(memory + "/memory.limit_in_bytes", "\(slice.memory.bytes)")
        // No swap beyond the limit: memsw (RAM + swap) gets the same value, where swap accounting exists.
        if exists(memory + "/memory.memsw.limit_in_bytes") { try write(memory + "/memory.memsw.limit_in_bytes", "\(slice.memory.bytes)") }
        try write(pids + "/pids.max", slice.pidsLimit.map(String.init) ?? "max")
    }

    /// Writes a new slice's limits to this existing cgroup, its tasks staying where they are
    /// (a live resize).
    public func update(slice: ResourceSlice) throws {
        guard directories.values.allSatisfy(exists) else {
            throw MicroVMError.notFound("cgroup \(name) does not exist: its instance may have ended")
        }
        try build(slice: slice, parts: name.split(separator: "/").map(String.init))
    }

    /// The files and values that put a slice's CPU weight and quota on the cgroup directory
    /// `dir` (v2: cpu.weight, cpu.max; v1: cpu.shares and the CFS period and quota), in the order
    /// to write them. Also used on cgroups made by others (libvirt's for a domain).
    public static func cpuFiles(_ dir: String, unified: Bool, slice: ResourceSlice) -> [(file: String, value: String)] {
        if unified {
            return [(dir + "/cpu.weight", "\(slice.cpuWeight)"),
                    (dir + "/cpu.max", slice.cpuQuota.map { "\(quotaMicros($0)) \(period)" } ?? "max \(period)")]
        }
        return [(dir + "/cpu.shares", "\(shares(weight: slice.cpuWeight))"), (dir + "/cpu.cfs_period_us", "\(period)"),
                (dir + "/cpu.cfs_quota_us", slice.cpuQuota.map { "\(quotaMicros($0))" } ?? "-1")]
    }

    /// cgroup v1 cpu.shares for a v2-style weight (100 → 1024, the kernel's default).
    public static func shares(weight: Int) -> Int { Enforcement.shares(weight: weight) }
    public static func quotaMicros(_ cpus: Double) -> Int { Enforcement.quotaMicros(cpus) }

    /// Moves a whole process (all its threads) into the cgroup.
    public func add(pid: Int32) throws {
        for dir in Set(directories.values).sorted() { try write(dir + "/cgroup.procs", "\(pid)") }
    }

    /// Moves one thread (v1: through `tasks`). cgroup v2 places processes, not threads, outside
    /// threaded subtrees, so there the thread's whole process moves.
    public func add(thread tid: Int32) throws {
        for dir in Set(directories.values).sorted() { try write(dir + (mode == .v2 ? "/cgroup.procs" : "/tasks"), "\(tid)") }
    }

    /// Moves every task out to its hierarchy's root and removes the directories, nested ones first.
    /// Removing a cgroup that is already gone is not an error.
    public func remove() throws {
        var failures: [String] = []
        for (controller, dir) in directories.sorted(by: { $0.key < $1.key }) where exists(dir) {
            guard let root = mounts[controller] else { continue }
            for sub in subdirectories(dir).reversed() + [dir] {
                for file in ["cgroup.procs"] + (mode == .v2 ? [] : ["tasks"]) {
                    for pid in ((try? read(sub + "/" + file)) ?? "").split(separator: "\n") {
                        try? write(root + "/cgroup.procs", String(pid))
                    }
                }
                var removed = false
                // A moved task may take a moment to leave; the kernel refuses rmdir until it has.
                for _ in 0..<50 {
                    if rmdir(sub) == 0 || errno == ENOENT { removed = true; break }
                    usleep(20_000)
                }
                if !removed { failures.append("\(sub): \(String(cString: strerror(errno)))") }
            }
        }
        if !failures.isEmpty {
            throw MicroVMError(.backend, "cannot remove cgroup \(name): \(failures.joined(separator: "; ")); check for tasks left in it")
        }
    }

    /// The values the kernel actually holds for this cgroup.
    public struct Values: Codable, Sendable, Equatable {
        public var cpus: [Int]?
        public var mems: String?
        /// v1 cpu.shares or v2 cpu.weight.
        public var cpuShares: Int?
        public var cpuWeight: Int?
        /// Quota and period in microseconds; quota nil means unlimited.
        public var cpuQuotaMicros: Int?
        public var cpuPeriodMicros: Int?
        /// nil means unlimited.
        public var memoryLimit: ByteCount?
        public var pidsMax: Int?
        /// Processes in the cgroup (from the cpuset or unified directory).
        public var processes: [Int32]
    }

    public func readBack() throws -> Values {
        func int(_ path: String) -> Int? { (try? read(path)).flatMap { Int($0) } }
        func limit(_ text: String?) -> ByteCount? {
            guard let text, let n = UInt64(text), n < (UInt64(Int64.max) & ~0xFFF) else { return nil }
            return ByteCount(n)
        }
        if mode == .v2 {
            guard let dir = directories["unified"] else { throw MicroVMError.notFound("cgroup \(name) has no directory") }
            let max = ((try? read(dir + "/cpu.max")) ?? "").split(separator: " ")
            return Values(cpus: (try? read(dir + "/cpuset.cpus")).flatMap { try? CPUList.parse($0) },
                          mems: try? read(dir + "/cpuset.mems"), cpuShares: nil, cpuWeight: int(dir + "/cpu.weight"),
                          cpuQuotaMicros: max.first.flatMap { Int($0) }, cpuPeriodMicros: max.count > 1 ? Int(max[1]) : nil,
                          memoryLimit: limit(try? read(dir + "/memory.max")), pidsMax: int(dir + "/pids.max"),
                          processes: pids(dir + "/cgroup.procs"))
        }
        guard let cpuset = directories["cpuset"], let cpu = directories["cpu"], let memory = directories["memory"], let pidsDir = directories["pids"] else {
            throw MicroVMError.notFound("cgroup \(name) lacks a controller directory")
        }
        let quota = int(cpu + "/cpu.cfs_quota_us")
        return Values(cpus: try CPUList.parse(try read(cpuset + "/cpuset.cpus")), mems: try read(cpuset + "/cpuset.mems"),
                      cpuShares: int(cpu + "/cpu.shares"), cpuWeight: nil,
                      cpuQuotaMicros: quota.flatMap { $0 < 0 ? nil : $0 }, cpuPeriodMicros: int(cpu + "/cpu.cfs_period_us"),
                      memoryLimit: limit(try? read(memory + "/memory.limit_in_bytes")), pidsMax: int(pidsDir + "/pids.max"),
                      processes: pids(cpuset + "/cgroup.procs"))
    }

    // MARK: files

    private func pids(_ path: String) -> [Int32] {
        ((try? read(path)) ?? "").split(separator: "\n").compactMap { Int32($0) }
    }

    private func subdirectories(_ dir: String) -> [String] {
        guard let items = try? FileManager.default.contentsOfDirectory(atPath: dir) else { return [] }
        var out: [String] = []
        for item in items.sorted() {
            var isDir: ObjCBool = false
            let path = dir + "/" + item
            if FileManager.default.fileExists(atPath: path, isDirectory: &isDir), isDir.boolValue {
                out.append(path)
                out += subdirectories(path)
            }
        }
        return out
    }

    private func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    private func makeDirectory(_ path: String) throws {
        if mkdir(path, 0o755) != 0 && errno != EEXIST {
            let e = errno
            throw MicroVMError(e == EACCES || e == EPERM ? .permissionDenied : .backend,
                               "cannot create cgroup directory \(path): run as root or delegate the cgroup to this user",
                               cause: SystemCallError("mkdir", errno: e))
        }
    }

    private func read(_ path: String) throws -> String {
        guard let text = readWholeText(path) else {
            throw MicroVMError(.notFound, "cannot read cgroup file \(path)", cause: SystemCallError("read", errno: errno))
        }
        return text.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// One write(2) of the whole value: cgroup files take a value per write and must not be
    /// replaced by a rename, as Foundation's atomic writes would.
    private func write(_ path: String, _ value: String) throws {
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw MicroVMError(.backend, "cannot open cgroup file \(path) to write '\(value)'", cause: SystemCallError("open", errno: errno))
        }
        defer { close(fd) }
        let bytes = Array(value.utf8)
        let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        guard n == bytes.count else {
            throw MicroVMError(.backend, "the kernel refused '\(value)' for \(path): check the value against the parent cgroup's limits",
                               cause: SystemCallError("write", errno: n < 0 ? errno : EIO))
        }
    }
}
