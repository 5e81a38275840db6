/// Allocator: shares the host's CPUs, memory and huge pages among VMs and containers. It reads
/// the host's capacity (`HostCapacity`), admits or refuses requests as a whole (`Placer`), records
/// grants in a SQLite ledger that every `mvm` process shares, reclaims grants whose owner died,
/// and enforces a grant with cgroups (`CgroupSet`) and thread affinity (`ThreadAffinity`).
///
/// ```swift
/// let allocator = try Allocator.open(paths: .default, config: try MicroVMConfig.load())
/// let grant = try allocator.allocate(SliceRequest(cpus: 2, placement: .dedicated, memory: .gibibytes(1),
///                                                 owner: "web-1", ownerPID: getpid()))
/// let cgroup = try CgroupSet.create(name: "microvm/web-1", slice: grant.slice)
/// try cgroup.add(pid: childPID)
/// // … later
/// try cgroup.remove()
/// try allocator.release(grant.id)
/// ```
import Foundation
import Synchronization
import GRDB
import MicroVMCore
import Host

/// The allocator over one ledger file and one host's capacity.
public final class Allocator: Sendable {
    public let capacity: HostCapacity
    public var ledgerPath: String { ledger.path }
    let ledger: Ledger
    /// Whether a grant's owner still runs; tests substitute their own notion of "dead".
    let ownerAlive: @Sendable (_ pid: Int32, _ startTime: UInt64?) -> Bool
    let procRoot: String

    /// Opens (creating when absent) the ledger at `paths.ledger` for this host's capacity, less
    /// the configured reservation. A `warmup` started earlier for the same ledger hands over the
    /// connection it opened meanwhile.
    public static func open(paths: Paths = .default, config: MicroVMConfig, roots: HostRoots = HostRoots(),
                            warmup: LedgerWarmup? = nil) throws -> Allocator {
        let warm = warmup?.take(path: paths.ledger, roots: roots)
        let host = try warm?.host ?? HostCapacity.probe(roots: roots)
        let capacity = try host.reserving(config.reservation)
        if let ledger = warm?.ledger { return Allocator(capacity: capacity, ledger: ledger) }
        try Paths.ensureDirectory(paths.state)
        // Owners are processes of this host: their liveness is always read from the real /proc.
        return try Allocator(capacity: capacity, ledgerPath: paths.ledger)
    }

    public convenience init(capacity: HostCapacity, ledgerPath: String, procRoot: String = "/proc",
                            ownerAlive: (@Sendable (_ pid: Int32, _ startTime: UInt64?) -> Bool)? = nil) throws {
        self.init(capacity: capacity, ledger: try Ledger(path: ledgerPath), procRoot: procRoot, ownerAlive: ownerAlive)
    }

    init(capacity: HostCapacity, ledger: Ledger, procRoot: String = "/proc",
         ownerAlive: (@Sendable (_ pid: Int32, _ startTime: UInt64?) -> Bool)? = nil) {
        self.capacity = capacity
        self.procRoot = procRoot
        self.ownerAlive = ownerAlive ?? { pid, start in ProcessIdentity.isAlive(pid: pid, startTime: start, procRoot: procRoot) }
        self.ledger = ledger
    }

    /// Scans the whole ledger file for damage (slow on a long event log: `mvm doctor` runs it,
    /// launches do not). Throws the ledger's corruption error, which says what to do.
    public func verifyLedger() throws {
        let problems = try ledger.integrityProblems()
        guard problems.isEmpty else {
            throw Ledger.corrupt(ledger.path, "fails SQLite's integrity check (\(problems.prefix(3).joined(separator: "; ")))")
        }
    }

    /// Grants `request` whole or throws one error naming the short resource. Grants of dead
    /// owners are reclaimed first, in the same transaction.
    @discardableResult
    public func allocate(_ request: SliceRequest) throws -> Grant {
        let pidStart = request.ownerPID.flatMap { ProcessIdentity.startTime(pid: $0, procRoot: procRoot) }
        if let pid = request.ownerPID, pidStart == nil, ownerAlive(pid, nil) == false {
            throw MicroVMError.invalidArgument("owner pid \(pid) is not a running process: pass the pid of the process that holds the grant")
        }
        return try ledger.immediate { db in
            _ = try reclaimDead(db)
            let snapshot = try Ledger.snapshot(db)
            let (slice, huge) = try Placer.decide(request, capacity: capacity, snapshot: snapshot)
            let grant = try Ledger.insert(db, request: request, slice: slice, hugePages: huge, pidStart: pidStart)
            try Ledger.log(db, kind: "grant", grant: grant, detail: Ledger.describe(grant))
            // Shared grants run on the pool, which just lost these CPUs.
            if slice.placement == .dedicated { try reshapeSharedPool(db) }
            return grant
        }
    }

    /// Records the shared pool (grantable CPUs no dedicated grant holds) as every shared grant's
    /// CPU set, after dedicated CPUs were taken or given back.
    private func reshapeSharedPool(_ db: Database) throws {
        let dedicated = try Ledger.snapshot(db).dedicated
        let pool = CPUList.format(capacity.grantableCPUs.filter { dedicated[$0] == nil })
        try db.execute(sql: "UPDATE grants SET cpuset = ? WHERE placement = 'shared' AND cpuset != ?", arguments: [pool, pool])
        if db.changesCount > 0 {
            try Ledger.log(db, kind: "reshape", grant: nil, detail: "\(db.changesCount) shared grants now on CPUs \(pool)")
        }
    }

    /// What a live grant should become; nil keeps the current value.
    public struct Resize: Sendable, Hashable, Codable {
        public var cpus: Int?
        public var memory: ByteCount?
        public var weight: Int?
        /// CPU quota in CPUs. When only `cpus` changes, a quota the new count cannot hold is
        /// lowered to it.
        public var quota: Double?
        public init(cpus: Int? = nil, memory: ByteCount? = nil, weight: Int? = nil, quota: Double? = nil) {
            self.cpus = cpus; self.memory = memory; self.weight = weight; self.quota = quota
        }
        public var isEmpty: Bool { cpus == nil && memory == nil && weight == nil && quota == nil }
    }

    /// Changes the live grant of `owner` in place, admitted like a new grant against everything
    /// else in the ledger: the whole change fits, or nothing changes and the error names what is
    /// short. Placement, huge pages, the owner and the holder stay; a dedicated grant keeps the
    /// CPUs it had (the first of them when it shrinks) and takes free ones when it grows.
    /// Returns the grant before and after; with `commit: false` nothing is written (a plan).
    @discardableResult
    public func resize(owner: String, _ change: Resize, commit: Bool = true) throws -> (old: Grant, new: Grant) {
        guard !change.isEmpty else {
            throw MicroVMError.invalidArgument("nothing to change: give --cpus, --memory, --weight or --quota")
        }
        return try resize(owner: owner, commit: commit) { s in
            let cpus = change.cpus ?? s.cpus
            return (cpus, change.memory ?? s.memory, change.weight ?? s.cpuWeight, change.quota ?? s.cpuQuota.map { min($0, Double(cpus)) })
        }
    }

    /// Sets the live grant of `owner` to `target`'s CPU count, memory, weight and quota exactly
    /// (a nil quota removes one), admitted as `resize(owner:_:)` is.
    @discardableResult
    public func resize(owner: String, exactly target: ResourceSlice, commit: Bool = true) throws -> (old: Grant, new: Grant) {
        try resize(owner: owner, commit: commit) { _ in (target.cpus, target.memory, target.cpuWeight, target.cpuQuota) }
    }

    private func resize(owner: String, commit: Bool,
                        _ target: (ResourceSlice) -> (cpus: Int, memory: ByteCount, weight: Int, quota: Double?)) throws -> (old: Grant, new: Grant) {
        try ledger.immediate(commit: commit) { db in
            _ = try reclaimDead(db)
            let held = try Ledger.grants(db, sql: "SELECT * FROM grants WHERE owner = ? ORDER BY id", arguments: [owner])
            guard let old = held.first else {
                throw MicroVMError.notFound("no live grant is owned by '\(owner)': see mvm alloc show")
            }
            guard held.count == 1 else {
                throw MicroVMError.invalidArgument("'\(owner)' owns \(held.count) grants (\(held.map { "#\($0.id)" }.joined(separator: ", "))): release the extra ones with mvm alloc release first")
            }
            let s = old.slice
            let t = target(s)
            let request = SliceRequest(cpus: t.cpus, placement: s.placement, weight: t.weight, quota: t.quota,
                                       memory: t.memory, hugePages: s.hugePages, pidsLimit: s.pidsLimit,
                                       owner: old.owner, ownerPID: old.pid, mode: old.mode,
                                       cpuSet: s.placement == .pinned && t.cpus == s.cpus ? s.cpuSet : nil)
            // Decided as though this grant were gone; a refusal rolls the deletion back.
            try db.execute(sql: "DELETE FROM grants WHERE id = ?", arguments: [old.id])
            var (slice, huge) = try Placer.decide(request, capacity: capacity, snapshot: try Ledger.snapshot(db))
            if s.placement == .dedicated {
                let kept = t.cpus <= s.cpus ? Array(s.cpuSet.prefix(t.cpus))
                                            : s.cpuSet + slice.cpuSet.filter { !s.cpuSet.contains($0) }.prefix(t.cpus - s.cpuSet.count)
                slice.cpuSet = kept.sorted()
                let nodes = Set(kept.map(capacity.node(of:)))
                slice.numaNode = capacity.nodes.count > 1 && nodes.count == 1 ? nodes.first : nil
            }
            var new = old
            new.slice = slice
            new.hugePageCount = huge
            try Ledger.insert(db, keeping: new)
            try Ledger.log(db, kind: "resize", grant: new, detail: Ledger.describeChange(from: old.slice, to: slice))
            if s.placement == .dedicated && s.cpuSet != slice.cpuSet { try reshapeSharedPool(db) }
            let stored = try Ledger.grants(db, sql: "SELECT * FROM grants WHERE id = ?", arguments: [old.id]).first ?? new
            return (old, stored)
        }
    }

    /// What `allocate` would grant now, without granting it (dead owners are not reclaimed either,
    /// so a refusal here may turn into a grant after `reclaimDead`).
    public func plan(_ request: SliceRequest) throws -> ResourceSlice {
        try ledger.read { db in
            try Placer.decide(request, capacity: capacity, snapshot: try Ledger.snapshot(db)).slice
        }
    }

    /// Releases one grant; returns it, or nil when no such grant is live.
    @discardableResult
    public func release(_ grantID: Int64) throws -> Grant? {
        try ledger.immediate { db in
            guard let g = try Ledger.grants(db, sql: "SELECT * FROM grants WHERE id = ?", arguments: [grantID]).first else { return nil }
            try Ledger.delete(db, g, kind: "release")
            return g
        }
    }

    /// Releases every grant an owner holds.
    @discardableResult
    public func release(owner: String) throws -> [Grant] {
        try ledger.immediate { db in
            let gs = try Ledger.grants(db, sql: "SELECT * FROM grants WHERE owner = ? ORDER BY id", arguments: [owner])
            for g in gs { try Ledger.delete(db, g, kind: "release") }
            return gs
        }
    }

    /// Names the process that holds a grant's resources (`Grant.holder`): from now on the grant
    /// is reclaimed only when its owner and that process are both gone. A holder that has
    /// already ended is not recorded.
    public func hold(_ grantID: Int64, pid: Int32, what: String) throws {
        let start = ProcessIdentity.startTime(pid: pid, procRoot: procRoot)
        guard start != nil || ownerAlive(pid, nil) else { return }
        try ledger.immediate { db in
            try db.execute(sql: "UPDATE grants SET holderPid = ?, holderStart = ?, holderWhat = ? WHERE id = ?",
                           arguments: [Int64(pid), start.map { Int64(bitPattern: $0) }, what, grantID])
            guard db.changesCount > 0, let g = try Ledger.grants(db, sql: "SELECT * FROM grants WHERE id = ?", arguments: [grantID]).first else { return }
            try Ledger.log(db, kind: "hold", grant: g, detail: "\(what) pid \(pid) holds it")
        }
    }

    /// Reclaims the grants whose owner process is gone (pid missing or reused) and whose holder,
    /// if one was named, is gone too; logs each.
    @discardableResult
    public func reclaimDead() throws -> [Grant] {
        try ledger.immediate { db in try reclaimDead(db) }
    }

    private func reclaimDead(_ db: Database) throws -> [Grant] {
        var known: [String: Bool] = [:]
        func alive(_ pid: Int32, _ start: UInt64?) -> Bool {
            let key = "\(pid):\(start.map(String.init) ?? "-")"
            if let v = known[key] { return v }
            let v = ownerAlive(pid, start)
            known[key] = v
            return v
        }
        var dead: [Grant] = []
        for g in try Ledger.grants(db, sql: "SELECT * FROM grants WHERE pid IS NOT NULL ORDER BY id") {
            guard let pid = g.pid, !alive(pid, g.pidStartTime) else { continue }
            if let h = g.holder, alive(h.pid, h.startTime) { continue }
            let holder = g.holder.map { " and its holder, \($0.what) pid \($0.pid), too" } ?? ""
            try Ledger.delete(db, g, kind: "reclaim", detail: "owner pid \(pid) is gone\(holder); " + Ledger.describe(g))
            dead.append(g)
        }
        return dead
    }

    /// Every live grant, oldest first.
    public func grants() throws -> [Grant] {
        try ledger.read { db in try Ledger.grants(db) }
    }

    /// What is granted and what is left.
    public func usage() throws -> Usage {
        try ledger.read { db in Usage(capacity: capacity, snapshot: try Ledger.snapshot(db)) }
    }

    /// The newest `limit` ledger events, oldest first.
    public func events(limit: Int = 50) throws -> [Event] {
        try ledger.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM events ORDER BY id DESC LIMIT ?", arguments: [limit]).reversed().map { row in
                Event(id: row["id"], time: Date(timeIntervalSince1970: row["time"]), kind: row["kind"],
                      grantID: row["grantID"], owner: row["owner"], detail: row["detail"])
            }
        }
    }

    public struct Event: Codable, Sendable, Hashable {
        public var id: Int64
        public var time: Date
        /// "grant", "release", "reclaim", "reshape", "hold" or "resize".
        public var kind: String
        public var grantID: Int64?
        public var owner: String?
        public var detail: String
    }

    /// Capacity less live grants.
    public struct Usage: Codable, Sendable, Equatable {
        public var grants: Int
        public var dedicatedCPUs: [Int]
        public var pinnedCPUs: [Int]
        /// CPUs neither dedicated nor reserved: where shared grants run.
        public var sharedPool: [Int]
        /// CPUs a new dedicated grant could take now.
        public var freeDedicatedCPUs: [Int]
        public var memoryGrantable: ByteCount
        public var memoryUsed: ByteCount
        public var memoryFree: ByteCount
        public var hugePagesUsed: Int
        public var hugePagesFree: Int

        init(capacity c: HostCapacity, snapshot s: LedgerSnapshot) {
            grants = s.grantCount
            dedicatedCPUs = s.dedicated.keys.sorted()
            pinnedCPUs = s.pinnedLoad.filter { $0.value > 0 }.keys.sorted()
            sharedPool = c.grantableCPUs.filter { s.dedicated[$0] == nil }
            let free = sharedPool.filter { (s.pinnedLoad[$0] ?? 0) == 0 }
            freeDedicatedCPUs = Array(free.prefix(max(0, sharedPool.count - s.largestShared)))
            memoryGrantable = c.grantableMemory
            memoryUsed = ByteCount(Placer.usedMemory(s, ratio: c.memoryOvercommit))
            memoryFree = c.grantableMemory - memoryUsed
            hugePagesUsed = s.hugePagesUsed
            hugePagesFree = max(0, c.hugePages.total - s.hugePagesUsed)
        }
    }
}


/// Opens an existing ledger and reads the host's capacity on another thread while the caller
/// reads its configuration and checks its input, so a launch does not wait for them in turn.
/// Only a ledger that already exists is opened early: a first ledger is still created at the
/// grant, after validation, so bad input leaves a new state directory as it was. A failed early
/// open is forgotten; the grant then opens the ledger itself and reports what is wrong with it.
public final class LedgerWarmup: Sendable {
    let path: String
    let roots = HostRoots()
    private let opened = Mutex<(ledger: Ledger?, host: HostCapacity?)>((nil, nil))
    private let done = DispatchGroup()

    public init(paths: Paths = .default) {
        path = paths.ledger
        let exists = FileManager.default.fileExists(atPath: path)
        done.enter()
        DispatchQueue.global(qos: .userInitiated).async { [self] in
            let host = try? HostCapacity.probe(roots: roots)
            let ledger = exists ? try? Ledger(path: path) : nil
            opened.withLock { $0 = (ledger, host) }
            done.leave()
        }
    }

    /// What was read for `path` and `roots`, once it is there; nil for what was not or failed.
    func take(path wanted: String, roots wantedRoots: HostRoots) -> (ledger: Ledger?, host: HostCapacity?)? {
        guard wanted == path, wantedRoots.proc == roots.proc, wantedRoots.sys == roots.sys else { return nil }
        done.wait()
        return opened.withLock { o in defer { o = (nil, nil) }; return o }
    }
}
