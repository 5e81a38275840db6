import Foundation
import MicroVMCore

/// What a caller asks the allocator for.
public struct SliceRequest: Codable, Sendable, Hashable {
    public var cpus: Int
    public var placement: Placement
    /// Relative CPU weight (1...10000, 100 = default).
    public var weight: Int
    /// CPU quota in CPUs (e.g. 1.5), nil for none.
    public var quota: Double?
    public var memory: ByteCount
    /// Back the memory with huge pages from the host's free pool.
    public var hugePages: Bool
    public var pidsLimit: Int?
    /// Who holds the grant (an instance name) and the process whose death releases it.
    public var owner: String
    public var ownerPID: Int32?
    /// Backend mode ("direct", "hosted", "container"), recorded for `mvm alloc show`.
    public var mode: String
    /// For pinned placements: the exact host CPUs wanted (nil lets the allocator choose).
    public var cpuSet: [Int]?

    public init(cpus: Int, placement: Placement = .shared, weight: Int = 100, quota: Double? = nil, memory: ByteCount,
                hugePages: Bool = false, pidsLimit: Int? = nil, owner: String, ownerPID: Int32? = nil, mode: String = "",
                cpuSet: [Int]? = nil) {
        self.cpus = cpus; self.placement = placement; self.weight = weight; self.quota = quota; self.memory = memory
        self.hugePages = hugePages; self.pidsLimit = pidsLimit; self.owner = owner; self.ownerPID = ownerPID
        self.mode = mode; self.cpuSet = cpuSet
    }

    /// A request for a configured profile's size.
    public init(profile: Profile, owner: String, ownerPID: Int32? = nil, mode: String = "") {
        self.init(cpus: profile.cpus, placement: profile.placement, weight: profile.cpuWeight ?? 100, quota: profile.cpuQuota,
                  memory: profile.memory, hugePages: profile.hugePages ?? false, pidsLimit: profile.pidsLimit,
                  owner: owner, ownerPID: ownerPID, mode: mode)
    }
}

/// A granted slice, as recorded in the ledger.
public struct Grant: Codable, Sendable, Hashable {
    public var id: Int64
    public var owner: String
    public var pid: Int32?
    /// The owner's start time (/proc/PID/stat field 22), so a reused pid is not mistaken for the owner.
    public var pidStartTime: UInt64?
    public var mode: String
    public var slice: ResourceSlice
    /// Huge pages taken from the pool (0 unless the slice asked for them).
    public var hugePageCount: Int
    public var created: Date
    /// The process holding the grant's resources once the backend started it (the VMM, QEMU,
    /// a container's init): the grant lives while the owner *or* the holder does, so killing
    /// `mvm` never frees resources a running VM or container still uses.
    public var holder: Holder?

    public struct Holder: Codable, Sendable, Hashable {
        public var pid: Int32
        public var startTime: UInt64?
        public var what: String
        public init(pid: Int32, startTime: UInt64?, what: String) { self.pid = pid; self.startTime = startTime; self.what = what }
    }

    public init(id: Int64, owner: String, pid: Int32?, pidStartTime: UInt64?, mode: String, slice: ResourceSlice, hugePageCount: Int,
                created: Date, holder: Holder? = nil) {
        self.id = id; self.owner = owner; self.pid = pid; self.pidStartTime = pidStartTime; self.mode = mode; self.slice = slice
        self.hugePageCount = hugePageCount; self.created = created; self.holder = holder
    }
}

/// The ledger's live grants reduced to what a placement decision needs. Built with aggregate
/// queries, so its size follows the host's CPU count, not the number of grants.
public struct LedgerSnapshot: Sendable, Equatable {
    /// CPU → the dedicated grant holding it.
    public var dedicated: [Int: Int64] = [:]
    /// CPU → how many pinned grants use it.
    public var pinnedLoad: [Int: Int] = [:]
    /// Memory of dedicated and pinned grants (never overcommitted).
    public var hardMemory: UInt64 = 0
    /// Memory of shared grants, before the overcommit ratio.
    public var sharedMemory: UInt64 = 0
    /// Node → memory held there by grants placed on a node.
    public var nodeMemory: [Int: UInt64] = [:]
    public var hugePagesUsed: Int = 0
    /// The most CPUs any live shared grant asked for: the shared pool must not shrink below it.
    public var largestShared: Int = 0
    public var grantCount: Int = 0
    public init() {}
}

/// The placement decision: a pure function of the request, the host and the snapshot.
public enum Placer {
    /// The slice `request` would get, or one error naming the resource and the shortfall.
    public static func decide(_ request: SliceRequest, capacity: HostCapacity, snapshot s: LedgerSnapshot) throws -> (slice: ResourceSlice, hugePages: Int) {
        try validate(request, capacity: capacity)
        let grantable = capacity.grantableCPUs
        let pool = grantable.filter { s.dedicated[$0] == nil }
        var cpuSet: [Int]
        var node: Int?
        switch request.placement {
        case .dedicated:
            let free = pool.filter { (s.pinnedLoad[$0] ?? 0) == 0 }
            // The shared pool must keep enough CPUs for the widest live shared grant.
            let keep = s.largestShared
            let usable = pool.count - keep
            guard free.count >= request.cpus, usable >= request.cpus else {
                var why = "needs \(request.cpus) dedicated CPU\(request.cpus == 1 ? "" : "s"), \(max(0, min(free.count, usable))) free"
                if !capacity.reservedCPUs.isEmpty { why += " after the \(capacity.reservedCPUs.count) reserved for the host" }
                if free.count < pool.count { why += "; CPUs \(CPUList.format(pool.filter { !free.contains($0) })) are held by pinned grants" }
                if keep > 0 && usable < free.count { why += "; the shared pool must keep \(keep) CPU\(keep == 1 ? "" : "s") for live shared grants" }
                throw MicroVMError(.insufficientResources, why + ": release a grant (mvm alloc release) or ask for fewer CPUs")
            }
            (cpuSet, node) = pickDedicated(request.cpus, free: free, capacity: capacity, snapshot: s, memory: request.memory.bytes)
        case .pinned:
            if let wanted = request.cpuSet {
                let set = Array(Set(wanted)).sorted()
                guard set.count == request.cpus else {
                    throw MicroVMError.invalidArgument("pinned request lists \(set.count) distinct CPUs (\(CPUList.format(set))) but asks for \(request.cpus)")
                }
                if let bad = set.first(where: { !grantable.contains($0) }) {
                    throw MicroVMError.invalidArgument("CPU \(bad) is not grantable on this host (grantable: \(CPUList.format(grantable)))")
                }
                if let taken = set.first(where: { s.dedicated[$0] != nil }) {
                    throw MicroVMError(.insufficientResources, "needs CPU \(taken) pinned, but dedicated grant \(s.dedicated[taken] ?? 0) holds it: choose other CPUs or release that grant")
                }
                cpuSet = set
            } else {
                guard pool.count >= request.cpus else {
                    throw MicroVMError(.insufficientResources, "needs \(request.cpus) pinned CPUs, \(pool.count) not held by dedicated grants: release a dedicated grant or ask for fewer CPUs")
                }
                cpuSet = pickPinned(request.cpus, pool: pool, capacity: capacity, load: s.pinnedLoad)
            }
            let nodes = Set(cpuSet.map(capacity.node(of:)))
            node = capacity.nodes.count > 1 && nodes.count == 1 ? nodes.first : nil
        case .shared:
            guard pool.count >= request.cpus else {
                throw MicroVMError(.insufficientResources, "needs \(request.cpus) shared CPUs, the shared pool has \(pool.count) (\(CPUList.format(pool))): release a dedicated grant or ask for fewer CPUs")
            }
            cpuSet = pool
            node = nil
        }

        var hugePages = 0
        if request.hugePages {
            let page = max(1, capacity.hugePages.pageSize.bytes)
            hugePages = Int((request.memory.bytes + page - 1) / page)
            let free = capacity.hugePages.total - s.hugePagesUsed
            guard hugePages <= free else {
                throw MicroVMError(.insufficientResources, "needs \(hugePages) huge pages of \(capacity.hugePages.pageSize) for \(request.memory), \(max(0, free)) free in the pool: raise /proc/sys/vm/nr_hugepages or drop --huge-pages")
            }
        } else {
            let used = usedMemory(s, ratio: capacity.memoryOvercommit)
            let add = request.placement == .shared ? UInt64((Double(request.memory.bytes) / capacity.memoryOvercommit).rounded(.up)) : request.memory.bytes
            let limit = capacity.grantableMemory.bytes
            guard used <= limit, add <= limit - used else {
                let free = ByteCount(limit >= used ? limit - used : 0)
                var why = "needs \(request.memory) of memory, \(format(free)) free"
                if capacity.reservedMemory.bytes > 0 { why += " after the \(capacity.reservedMemory) host reservation" }
                if request.placement == .shared && capacity.memoryOvercommit > 1 { why += " (shared grants count 1/\(capacity.memoryOvercommit) of their size)" }
                throw MicroVMError(.insufficientResources, why + ": release a grant (mvm alloc release) or ask for less")
            }
        }
        let slice = ResourceSlice(cpus: request.cpus, placement: request.placement, cpuSet: cpuSet, cpuWeight: request.weight,
                                  cpuQuota: request.quota, memory: request.memory, hugePages: request.hugePages,
                                  pidsLimit: request.pidsLimit, numaNode: node)
        return (slice, hugePages)
    }

    /// Memory counted against the host: hard grants in full, shared ones divided by the ratio.
    static func usedMemory(_ s: LedgerSnapshot, ratio: Double) -> UInt64 {
        s.hardMemory + UInt64((Double(s.sharedMemory) / ratio).rounded(.up))
    }

    static func validate(_ r: SliceRequest, capacity: HostCapacity) throws {
        guard r.cpus >= 1 else { throw MicroVMError.invalidArgument("a slice needs at least 1 CPU (asked for \(r.cpus))") }
        let n = capacity.grantableCPUs.count
        guard r.cpus <= n else {
            throw MicroVMError.invalidArgument("asks for \(r.cpus) CPUs but this host has \(n) grantable (\(capacity.onlineCPUs.count) online, \(capacity.reservedCPUs.count) reserved)")
        }
        guard r.memory.bytes >= ByteCount.mebibytes(1).bytes else {
            throw MicroVMError.invalidArgument("a slice needs memory (asked for \(r.memory)): give e.g. --memory 256M")
        }
        guard r.memory < capacity.memoryTotal else {
            throw MicroVMError.invalidArgument("asks for \(r.memory) of memory but the host has \(capacity.memoryTotal) in all")
        }
        guard (1...10_000).contains(r.weight) else {
            throw MicroVMError.invalidArgument("CPU weight \(r.weight) is out of range: use 1...10000 (100 is the default)")
        }
        if let q = r.quota {
            guard q.isFinite, q >= 0.01, q <= Double(r.cpus) else {
                throw MicroVMError.invalidArgument("CPU quota \(q) is out of range: use 0.01...\(r.cpus) CPUs")
            }
        }
        if let p = r.pidsLimit, p < 1 { throw MicroVMError.invalidArgument("pids limit \(p) must be at least 1") }
        if r.cpuSet != nil && r.placement != .pinned {
            throw MicroVMError.invalidArgument("a CPU list can only be given for pinned placement (asked for \(r.placement.rawValue))")
        }
        guard !r.owner.isEmpty, r.owner.count <= 256 else { throw MicroVMError.invalidArgument("a grant needs an owner name of 1...256 characters") }
    }

    /// Whole cores first (SMT siblings stay together), inside one NUMA node when one can hold the
    /// grant's CPUs and memory; the node with the most free CPUs wins, so nodes fill evenly.
    static func pickDedicated(_ n: Int, free: [Int], capacity: HostCapacity, snapshot s: LedgerSnapshot, memory: UInt64) -> ([Int], Int?) {
        let freeSet = Set(free)
        if capacity.nodes.count > 1 {
            var candidates: [(node: HostCapacity.NUMANode, cpus: [Int])] = []
            for node in capacity.nodes {
                let cpus = node.cpus.filter(freeSet.contains)
                let used = s.nodeMemory[node.id] ?? 0
                if cpus.count >= n && node.memory.bytes >= used && node.memory.bytes - used >= memory { candidates.append((node, cpus)) }
            }
            candidates.sort { a, b in a.cpus.count != b.cpus.count ? a.cpus.count > b.cpus.count : a.node.id < b.node.id }
            if let (node, cpus) = candidates.first {
                return (pickCores(n, free: Set(cpus), cores: capacity.cores), node.id)
            }
        }
        return (pickCores(n, free: freeSet, cores: capacity.cores), nil)
    }

    static func pickCores(_ n: Int, free: Set<Int>, cores: [[Int]]) -> [Int] {
        var groups = cores.map { core in (whole: core.allSatisfy(free.contains), cpus: core.filter(free.contains)) }.filter { !$0.cpus.isEmpty }
        var out: [Int] = []
        while out.count < n && !groups.isEmpty {
            let need = n - out.count
            // Best fit: the smallest group that covers what is left, preferring partly used cores
            // so whole cores stay whole; else the largest whole core.
            let fits = groups.indices.filter { groups[$0].cpus.count >= need }
            let i: Int
            if let best = fits.min(by: { a, b in
                let (ga, gb) = (groups[a], groups[b])
                if ga.cpus.count != gb.cpus.count { return ga.cpus.count < gb.cpus.count }
                if ga.whole != gb.whole { return !ga.whole }
                return ga.cpus[0] < gb.cpus[0]
            }) { i = best } else {
                i = groups.indices.max(by: { groups[$0].cpus.count < groups[$1].cpus.count || (groups[$0].cpus.count == groups[$1].cpus.count && groups[$0].cpus[0] > groups[$1].cpus[0]) })!
            }
            out.append(contentsOf: groups[i].cpus.prefix(need))
            groups.remove(at: i)
        }
        return out.sorted()
    }

    /// The least-loaded CPUs, inside one NUMA node when one has enough.
    static func pickPinned(_ n: Int, pool: [Int], capacity: HostCapacity, load: [Int: Int]) -> [Int] {
        func best(_ cpus: [Int]) -> [Int] {
            Array(cpus.sorted { (load[$0] ?? 0, $0) < (load[$1] ?? 0, $1) }.prefix(n)).sorted()
        }
        if capacity.nodes.count > 1 {
            let poolSet = Set(pool)
            let options = capacity.nodes.map { $0.cpus.filter(poolSet.contains) }.filter { $0.count >= n }.map(best)
            if let pick = options.min(by: { a, b in a.reduce(0) { $0 + (load[$1] ?? 0) } < b.reduce(0) { $0 + (load[$1] ?? 0) } }) {
                return pick
            }
        }
        return best(pool)
    }

    /// "1.5G", "512M": the shortfall in the unit a person reads.
    static func format(_ b: ByteCount) -> String {
        if b.bytes >= 1 << 30 {
            return b.bytes % (1 << 30) == 0 ? "\(b.bytes >> 30)G" : String(format: "%.1fG", Double(b.bytes) / Double(1 << 30))
        }
        if b.bytes >= 1 << 20 { return "\(b.mebibytes)M" }
        return b.description
    }
}
