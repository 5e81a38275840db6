import Foundation
import GRDB
import GRDBSQLite
import MicroVMCore

/// The grant ledger: one SQLite file shared by every `mvm` process on the host. Each allocation
/// reads the aggregate state and inserts its grant inside one IMMEDIATE transaction, so two
/// processes can never both take the last CPU.
final class Ledger: Sendable {
    let path: String
    let queue: DatabaseQueue

    init(path: String) throws {
        self.path = path
        try Ledger.checkHeader(path)
        var config = Configuration()
        config.busyMode = .timeout(30)
        config.label = "microvm-ledger"
        // Write-ahead log, synced at checkpoints: a crash keeps the ledger consistent (it may lose
        // the last grants, whose owners died with the host), and a grant costs no fsync.
        // The log is kept between processes (truncated to 1 MiB), so each `mvm run` does not
        // create it, sync the directory and delete it again. It is still checkpointed when the
        // last connection closes (after the run): a log left full would be read back frame by
        // frame by the next process's open, before its grant.
        config.prepareDatabase { db in
            var persist: CInt = 1
            _ = sqlite3_file_control(db.sqliteConnection, nil, SQLITE_FCNTL_PERSIST_WAL, &persist)
            try Ledger.retryingWhileBusy { try db.execute(sql: "PRAGMA journal_mode = WAL") }
            try db.execute(sql: "PRAGMA synchronous = NORMAL")
            try db.execute(sql: "PRAGMA journal_size_limit = 1048576")
        }
        do {
            queue = try DatabaseQueue(path: path, configuration: config)
        } catch {
            throw Ledger.corrupt(path, "cannot be opened as a SQLite database", cause: error)
        }
        // No integrity scan here: it reads every page, and the event log only grows. SQLite finds
        // a damaged page when a grant reads it (reported as `corrupt` by `immediate` and `read`);
        // `mvm doctor` scans the whole file (`integrityProblems`).
        do {
            // A ledger already at this schema needs no lock and no migrator.
            let version = try queue.read { db in try Int.fetchOne(db, sql: "PRAGMA user_version") ?? 0 }
            if version != Ledger.schemaVersion { try Ledger.migrateExclusively(queue, path: path) }
        } catch let e as MicroVMError {
            throw e
        } catch {
            throw Ledger.corrupt(path, "is not a usable SQLite database", cause: error)
        }
    }

    /// Switching a new ledger to WAL takes an exclusive lock, and SQLite answers SQLITE_BUSY at
    /// once, without the busy handler, when another process is switching or recovering the same
    /// file: several `mvm` processes opening a fresh ledger together then fail at random. Retry
    /// for as long as the busy timeout would have waited.
    static func retryingWhileBusy(for seconds: Double = 30, _ body: () throws -> Void) throws {
        let deadline = Date().addingTimeInterval(seconds)
        var pause: useconds_t = 1_000
        while true {
            do { return try body() } catch let error as DatabaseError where error.resultCode == .SQLITE_BUSY && Date() < deadline {
                usleep(pause)
                pause = min(pause * 2, 50_000)
            }
        }
    }

    /// Migrations check and create tables in separate steps; processes opening a new ledger at
    /// once take turns through a lock file beside it.
    static func migrateExclusively(_ queue: DatabaseQueue, path: String) throws {
        let fd = open(path + ".lock", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw MicroVMError(.permissionDenied, "cannot create \(path).lock: make the state directory writable", cause: SystemCallError("open", errno: errno))
        }
        defer { close(fd) }
        guard flock(fd, LOCK_EX) == 0 else { throw MicroVMError(.internalError, "cannot lock \(path).lock", cause: SystemCallError("flock", errno: errno)) }
        defer { flock(fd, LOCK_UN) }
        try migrator.migrate(queue)
        try queue.write { db in try db.execute(sql: "PRAGMA user_version = \(schemaVersion)") }
    }

    /// Stamped in SQLite's `user_version` once every migration has run; bump it with each new one.
    static let schemaVersion = 3

    static func corrupt(_ path: String, _ what: String, cause: (any Error)? = nil) -> MicroVMError {
        MicroVMError(.corruptState, "the allocator ledger \(path) \(what): move it aside (mv \(path) \(path).bad) so a new one is created, then check for leftover instances with mvm ps; the grants it held are forgotten", cause: cause)
    }

    /// A non-empty file that does not start with SQLite's magic is someone else's data or garbage:
    /// refuse it rather than let SQLite overwrite or half-read it.
    static func checkHeader(_ path: String) throws {
        guard let h = FileHandle(forReadingAtPath: path) else { return }
        defer { try? h.close() }
        let head = (try? h.read(upToCount: 16)) ?? Data()
        if !head.isEmpty && head != Data("SQLite format 3\0".utf8) {
            throw corrupt(path, "is not a SQLite database (its header is not 'SQLite format 3')")
        }
    }

    static let migrator: DatabaseMigrator = {
        var m = DatabaseMigrator()
        m.registerMigration("v1") { db in
            try db.create(table: "grants") { t in
                t.autoIncrementedPrimaryKey("id")
                t.column("owner", .text).notNull()
                t.column("pid", .integer)
                t.column("pidStart", .integer)
                t.column("mode", .text).notNull().defaults(to: "")
                t.column("cpus", .integer).notNull()
                t.column("cpuset", .text).notNull()
                t.column("memory", .integer).notNull()
                t.column("hugePages", .integer).notNull().defaults(to: 0)
                t.column("placement", .text).notNull()
                t.column("weight", .integer).notNull()
                t.column("quota", .double)
                t.column("pidsLimit", .integer)
                t.column("numaNode", .integer)
                t.column("created", .double).notNull()
            }
            // Covers the snapshot's aggregates, so a decision reads an index, not every row.
            try db.create(index: "grants_by_placement", on: "grants", columns: ["placement", "hugePages", "memory", "cpus", "numaNode", "cpuset"])
            try db.create(index: "grants_by_owner", on: "grants", columns: ["owner"])
            try db.create(index: "grants_by_pid", on: "grants", columns: ["pid", "pidStart"])
            try db.create(table: "events") { t in
                t.autoIncrementedPrimaryKey("id")
                t.column("time", .double).notNull()
                t.column("kind", .text).notNull()
                t.column("grantID", .integer)
                t.column("owner", .text)
                t.column("detail", .text).notNull().defaults(to: "")
            }
            // The event log is append-only: the database itself refuses edits.
            try db.execute(sql: """
                CREATE TRIGGER events_no_update BEFORE UPDATE ON events BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
                CREATE TRIGGER events_no_delete BEFORE DELETE ON events BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
                """)
        }
        m.registerMigration("v2-pinned-index") { db in
            // Lets the per-CPU pinned load be grouped from an index instead of a sort.
            try db.create(index: "grants_by_cpuset", on: "grants", columns: ["placement", "cpuset"])
        }
        m.registerMigration("v3-holders") { db in
            // The process that holds a grant's resources (the VMM, QEMU, a container's init),
            // which may outlive the owner (`mvm run`) that asked for the grant.
            try db.alter(table: "grants") { t in
                t.add(column: "holderPid", .integer)
                t.add(column: "holderStart", .integer)
                t.add(column: "holderWhat", .text)
            }
        }
        return m
    }()

    /// Runs `body` inside one IMMEDIATE transaction: the write lock is taken before the first read.
    /// With `commit: false` its writes are rolled back (a plan of what it would do).
    func immediate<T>(commit: Bool = true, _ body: (Database) throws -> T) throws -> T {
        try reportingDamage {
            try queue.writeWithoutTransaction { db in
                var out: T?
                try db.inTransaction(.immediate) {
                    out = try body(db)
                    return commit ? .commit : .rollback
                }
                guard let out else { throw MicroVMError(.internalError, "ledger transaction returned nothing") }
                return out
            }
        }
    }

    func read<T>(_ body: (Database) throws -> T) throws -> T {
        try reportingDamage { try queue.read { db in try body(db) } }
    }

    /// A damaged page met by a query becomes the ledger's corruption error, which says what to do.
    private func reportingDamage<T>(_ body: () throws -> T) throws -> T {
        do { return try body() } catch let e as DatabaseError where [.SQLITE_CORRUPT, .SQLITE_NOTADB].contains(e.resultCode) {
            throw Ledger.corrupt(path, "is damaged (\(e.message ?? "\(e.resultCode)"))", cause: e)
        }
    }

    /// SQLite's page-by-page check of the whole file: empty when the ledger is sound.
    func integrityProblems() throws -> [String] {
        let result = try reportingDamage { try queue.read { db in try String.fetchAll(db, sql: "PRAGMA quick_check") } }
        return result == ["ok"] ? [] : result
    }

    // MARK: rows

    static func snapshot(_ db: Database) throws -> LedgerSnapshot {
        var s = LedgerSnapshot()
        for row in try Row.fetchAll(db, sql: "SELECT id, cpuset FROM grants WHERE placement = 'dedicated'") {
            let id: Int64 = row["id"]
            for cpu in (try? CPUList.parse(row["cpuset"] as String)) ?? [] { s.dedicated[cpu] = id }
        }
        for row in try Row.fetchAll(db, sql: "SELECT cpuset, COUNT(*) AS n FROM grants WHERE placement = 'pinned' GROUP BY cpuset") {
            let n: Int = row["n"]
            for cpu in (try? CPUList.parse(row["cpuset"] as String)) ?? [] { s.pinnedLoad[cpu, default: 0] += n }
        }
        for row in try Row.fetchAll(db, sql: """
            SELECT placement, SUM(CASE WHEN hugePages = 0 THEN memory ELSE 0 END) AS mem,
                   SUM(hugePages) AS huge, MAX(cpus) AS widest, COUNT(*) AS n
            FROM grants GROUP BY placement
            """) {
            let shared = (row["placement"] as String) == Placement.shared.rawValue
            let mem = UInt64(max(0, row["mem"] as Int64? ?? 0))
            if shared { s.sharedMemory = mem; s.largestShared = row["widest"] ?? 0 } else { s.hardMemory += mem }
            s.hugePagesUsed += row["huge"] as Int? ?? 0
            s.grantCount += row["n"] as Int? ?? 0
        }
        for row in try Row.fetchAll(db, sql: "SELECT numaNode, SUM(memory) AS mem FROM grants WHERE numaNode IS NOT NULL GROUP BY numaNode") {
            s.nodeMemory[row["numaNode"]] = UInt64(max(0, row["mem"] as Int64? ?? 0))
        }
        return s
    }

    static func insert(_ db: Database, request r: SliceRequest, slice: ResourceSlice, hugePages: Int, pidStart: UInt64?) throws -> Grant {
        // Rounded through the stored form, so a grant read back compares equal to the one returned.
        let now = Date(timeIntervalSince1970: Date().timeIntervalSince1970)
        let pid: Int64? = r.ownerPID.map { Int64($0) }
        let start: Int64? = pidStart.map { Int64(bitPattern: $0) }
        try db.execute(sql: """
            INSERT INTO grants (owner, pid, pidStart, mode, cpus, cpuset, memory, hugePages, placement, weight, quota, pidsLimit, numaNode, created)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            """, arguments: [r.owner, pid, start, r.mode, slice.cpus,
                             slice.cpuSetList, Int64(slice.memory.bytes), hugePages, slice.placement.rawValue, slice.cpuWeight,
                             slice.cpuQuota, slice.pidsLimit, slice.numaNode, now.timeIntervalSince1970])
        return Grant(id: db.lastInsertedRowID, owner: r.owner, pid: r.ownerPID, pidStartTime: pidStart, mode: r.mode,
                     slice: slice, hugePageCount: hugePages, created: now)
    }

    /// Stores `g` under its own id, owner, holder and creation time (a resized grant).
    static func insert(_ db: Database, keeping g: Grant) throws {
        let s = g.slice
        try db.execute(sql: """
            INSERT INTO grants (id, owner, pid, pidStart, mode, cpus, cpuset, memory, hugePages, placement, weight, quota, pidsLimit,
                                numaNode, created, holderPid, holderStart, holderWhat)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            """, arguments: [g.id, g.owner, g.pid.map { Int64($0) }, g.pidStartTime.map { Int64(bitPattern: $0) }, g.mode, s.cpus,
                             s.cpuSetList, Int64(s.memory.bytes), g.hugePageCount, s.placement.rawValue, s.cpuWeight,
                             s.cpuQuota, s.pidsLimit, s.numaNode, g.created.timeIntervalSince1970,
                             g.holder.map { Int64($0.pid) }, g.holder?.startTime.map { Int64(bitPattern: $0) }, g.holder?.what])
    }

    /// "cpus 1 → 2, memory 64 MiB → 128 MiB": what a resize changed.
    static func describeChange(from a: ResourceSlice, to b: ResourceSlice) -> String {
        var parts: [String] = []
        if a.cpus != b.cpus { parts.append("cpus \(a.cpus) → \(b.cpus)") }
        if a.cpuSet != b.cpuSet { parts.append("cpuset \(a.cpuSetList) → \(b.cpuSetList)") }
        if a.memory != b.memory { parts.append("memory \(a.memory) → \(b.memory)") }
        if a.cpuWeight != b.cpuWeight { parts.append("weight \(a.cpuWeight) → \(b.cpuWeight)") }
        if a.cpuQuota != b.cpuQuota { parts.append("quota \(a.cpuQuota.map { "\($0)" } ?? "none") → \(b.cpuQuota.map { "\($0)" } ?? "none")") }
        return parts.isEmpty ? "unchanged" : parts.joined(separator: ", ")
    }

    static func grant(_ row: Row) -> Grant {
        let placement = Placement(rawValue: row["placement"]) ?? .shared
        let slice = ResourceSlice(cpus: row["cpus"], placement: placement,
                                  cpuSet: (try? CPUList.parse(row["cpuset"] as String)) ?? [],
                                  cpuWeight: row["weight"], cpuQuota: row["quota"],
                                  memory: ByteCount(UInt64(max(0, row["memory"] as Int64))),
                                  hugePages: (row["hugePages"] as Int) > 0, pidsLimit: row["pidsLimit"], numaNode: row["numaNode"])
        let holder = (row["holderPid"] as Int64?).map { pid in
            Grant.Holder(pid: Int32(truncatingIfNeeded: pid), startTime: (row["holderStart"] as Int64?).map { UInt64(bitPattern: $0) },
                         what: row["holderWhat"] ?? "")
        }
        return Grant(id: row["id"], owner: row["owner"], pid: (row["pid"] as Int64?).map { Int32(truncatingIfNeeded: $0) },
                     pidStartTime: (row["pidStart"] as Int64?).map { UInt64(bitPattern: $0) }, mode: row["mode"],
                     slice: slice, hugePageCount: row["hugePages"], created: Date(timeIntervalSince1970: row["created"]), holder: holder)
    }

    static func grants(_ db: Database, sql: String = "SELECT * FROM grants ORDER BY id", arguments: StatementArguments = []) throws -> [Grant] {
        try Row.fetchAll(db, sql: sql, arguments: arguments).map(grant)
    }

    static func delete(_ db: Database, _ g: Grant, kind: String, detail: String = "") throws {
        try db.execute(sql: "DELETE FROM grants WHERE id = ?", arguments: [g.id])
        try log(db, kind: kind, grant: g, detail: detail.isEmpty ? describe(g) : detail)
    }

    static func log(_ db: Database, kind: String, grant: Grant?, detail: String) throws {
        try db.execute(sql: "INSERT INTO events (time, kind, grantID, owner, detail) VALUES (?, ?, ?, ?, ?)",
                       arguments: [Date().timeIntervalSince1970, kind, grant?.id, grant?.owner, detail])
    }

    static func describe(_ g: Grant) -> String {
        "\(g.slice.placement.rawValue) cpus=\(g.slice.cpuSetList) n=\(g.slice.cpus) memory=\(g.slice.memory)" + (g.pid.map { " pid=\($0)" } ?? "")
            + (g.holder.map { " held by \($0.what) pid \($0.pid)" } ?? "")
    }
}
