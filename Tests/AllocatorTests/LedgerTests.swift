import Foundation
import Testing
import GRDB
import MicroVMCore
import ConfigFile
@testable import Allocator
import Host

@Suite struct LedgerTests {
    static let host = HostCapacity(onlineCPUs: [0, 1, 2, 3], memoryTotal: .gibibytes(8), reservedMemory: .gibibytes(1))

    @Test func grantsPersistAcrossOpensAndEventsAreLogged() throws {
        let dir = Fixture.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/ledger.sqlite"
        let a = try Allocator(capacity: Self.host, ledgerPath: path, ownerAlive: { _, _ in true })
        let g = try a.allocate(SliceRequest(cpus: 1, placement: .dedicated, memory: .gibibytes(1), owner: "web", ownerPID: 4242, mode: "direct"))
        let b = try Allocator(capacity: Self.host, ledgerPath: path, ownerAlive: { _, _ in true })
        #expect(try b.grants() == [g])
        #expect(try b.release(g.id) == g)
        #expect(try b.release(g.id) == nil)
        #expect(try a.grants().isEmpty)
        #expect(try a.events().map(\.kind) == ["grant", "release"])
    }

    @Test func theEventLogIsAppendOnly() throws {
        let dir = Fixture.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let a = try Allocator(capacity: Self.host, ledgerPath: dir + "/ledger.sqlite", ownerAlive: { _, _ in true })
        try a.allocate(SliceRequest(cpus: 1, memory: .mebibytes(64), owner: "x"))
        let db = try DatabaseQueue(path: dir + "/ledger.sqlite")
        #expect(throws: (any Error).self) { try db.write { try $0.execute(sql: "DELETE FROM events") } }
        #expect(throws: (any Error).self) { try db.write { try $0.execute(sql: "UPDATE events SET kind = 'x'") } }
        #expect(try db.read { try Int.fetchOne($0, sql: "SELECT COUNT(*) FROM events") } == 1)
    }

    @Test func aGarbageLedgerIsReportedNotRecreated() throws {
        let dir = Fixture.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/ledger.sqlite"
        let garbage = Data((0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) })
        try garbage.write(to: URL(fileURLWithPath: path))
        let e = try #require(throws: MicroVMError.self) { try Allocator(capacity: Self.host, ledgerPath: path) }
        #expect(e.code == .corruptState)
        #expect(e.message.contains(path) && e.message.contains("mv "), "\(e.message)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == garbage, "the file is left as it was")
    }

    @Test func aDamagedSQLiteLedgerIsReported() throws {
        let dir = Fixture.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/ledger.sqlite"
        do {
            let a = try Allocator(capacity: Self.host, ledgerPath: path, ownerAlive: { _, _ in true })
            for i in 0..<200 { try a.allocate(SliceRequest(cpus: 1, memory: .mebibytes(1), owner: "filler-\(i)")) }
        }
        // The ledger keeps its write-ahead log between processes: copy it into the file and empty
        // it, so the damage below is not masked by newer copies of the pages in the log.
        try DatabaseQueue(path: path).writeWithoutTransaction { try $0.execute(sql: "PRAGMA wal_checkpoint(TRUNCATE)") }
        // Keep SQLite's header but overwrite the pages after the first.
        var bytes = try Data(contentsOf: URL(fileURLWithPath: path))
        #expect(bytes.count > 8192)
        for i in 4096..<bytes.count { bytes[i] = 0xA5 }
        try bytes.write(to: URL(fileURLWithPath: path))
        // Opening reads only the header; the first grant meets the damaged pages, and the full scan
        // (`mvm doctor`) finds them without granting anything.
        let e = try #require(throws: MicroVMError.self) {
            let a = try Allocator(capacity: Self.host, ledgerPath: path)
            try a.allocate(SliceRequest(cpus: 1, memory: .mebibytes(1), owner: "after-damage"))
        }
        #expect(e.code == .corruptState && e.message.contains(path) && e.message.contains("mv \(path)"), "\(e.message)")
        let scan = try #require(throws: MicroVMError.self) { try Allocator(capacity: Self.host, ledgerPath: path).verifyLedger() }
        #expect(scan.code == .corruptState && scan.message.contains(path), "\(scan.message)")
    }

    @Test func aWarmupCreatesNothingAndHandsOverAnExistingLedger() throws {
        let dir = Fixture.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let paths = Paths(state: dir + "/state", cache: dir + "/cache")
        let config = try MicroVMConfig.load()
        // No ledger yet: the warm-up only reads the host, and the state directory is not made.
        let cold = LedgerWarmup(paths: paths)
        _ = cold.take(path: paths.ledger, roots: HostRoots())
        #expect(!FileManager.default.fileExists(atPath: paths.state))
        let first = try Allocator.open(paths: paths, config: config, warmup: cold)
        let g = try first.allocate(SliceRequest(cpus: 1, memory: .mebibytes(16), owner: "first", ownerPID: getpid()))
        // An existing ledger is opened ahead and handed over: the grant made before is seen.
        let warm = LedgerWarmup(paths: paths)
        let second = try Allocator.open(paths: paths, config: config, warmup: warm)
        #expect(try second.grants().map(\.id) == [g.id])
        #expect(second.capacity.grantableCPUs == first.capacity.grantableCPUs)
        // A warm-up for another ledger is not used for this one.
        #expect(LedgerWarmup(paths: Paths(state: dir + "/other", cache: dir)).take(path: paths.ledger, roots: HostRoots()) == nil)
    }

    @Test func aSoundLedgerPassesTheFullScanAndReopensWithoutMigrating() throws {
        let dir = Fixture.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/ledger.sqlite"
        try Allocator(capacity: Self.host, ledgerPath: path).allocate(SliceRequest(cpus: 1, memory: .mebibytes(1), owner: "a"))
        let again = try Allocator(capacity: Self.host, ledgerPath: path)
        try again.verifyLedger()
        #expect(try again.grants().map(\.owner) == ["a"])
    }

    @Test func aDeadOwnersGrantIsReclaimedAtTheNextAllocation() throws {
        let dir = Fixture.tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let a = try Allocator(capacity: Self.host, ledgerPath: dir + "/ledger.sqlite")
        let child = try Process.run(URL(fileURLWithPath: "/bin/sleep"), arguments: ["30"])
        defer { if child.isRunning { child.terminate() } }
        let g = try a.allocate(SliceRequest(cpus: 4, placement: .dedicated, memory: .gibibytes(1), owner: "doomed", ownerPID: child.processIdentifier))
        #expect(g.pidStartTime != nil && g.pidStartTime == ProcessIdentity.startTime(pid: child.processIdentifier))
        #expect(throws: MicroVMError.self) { try a.allocate(SliceRequest(cpus: 1, placement: .dedicated, memory: .mebibytes(64), owner: "next", ownerPID: getpid())) }
        child.terminate()
        child.waitUntilExit()
        let next = try a.allocate(SliceRequest(cpus: 1, placement: .dedicated, memory: .mebibytes(64), owner: "next", ownerPID: getpid()))
        #expect(try a.grants() == [next])
        let reclaim = try #require(try a.events().first { $0.kind == "reclaim" })
        #expect(reclaim.grantID == g.id && reclaim.detail.contains("pid \(child.processIdentifier)"))
    }

    @Test func aReusedPidDoesNotKeepAGrantAlive() throws {
        let me = getpid()
        let start = try #require(ProcessIdentity.startTime(pid: me))
        #expect(ProcessIdentity.isAlive(pid: me, startTime: start))
        #expect(!ProcessIdentity.isAlive(pid: me, startTime: start + 1), "same pid, other start time: another process")
        #expect(!ProcessIdentity.isAlive(pid: Int32.max, startTime: nil))
        #expect(ProcessIdentity.startTime(pid: -1) == nil)
    }

    @Test func startTimeParsesCommandsWithSpacesAndParentheses() throws {
        let root = Fixture.tempDir("proc")
        defer { try? FileManager.default.removeItem(atPath: root) }
        let fields = (3...52).map { $0 == 22 ? "987654" : "\($0)" }
        try Fixture.write(root + "/77/stat", "77 (evil) name (x) " + fields.joined(separator: " ") + "\n")
        #expect(ProcessIdentity.startTime(pid: 77, procRoot: root) == 987654)
        try Fixture.write(root + "/78/stat", "78 (short) S 1 2")
        #expect(ProcessIdentity.startTime(pid: 78, procRoot: root) == nil)
    }

    @Test func releaseByOwnerAndDeadOwners() throws {
        let dead = DeadSet()
        let (a, dir) = try Fixture.allocator(Self.host, dead: dead)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try a.allocate(SliceRequest(cpus: 1, memory: .mebibytes(64), owner: "x", ownerPID: 100))
        try a.allocate(SliceRequest(cpus: 1, memory: .mebibytes(64), owner: "x", ownerPID: 100))
        try a.allocate(SliceRequest(cpus: 1, memory: .mebibytes(64), owner: "y", ownerPID: 200))
        #expect(try a.release(owner: "x").count == 2)
        dead.insert(200)
        #expect(try a.reclaimDead().map(\.owner) == ["y"])
        #expect(try a.grants().isEmpty)
    }

    @Test func decisionTimeWithManyLiveGrants() throws {
        let (median, p99) = try AllocatorBench.placementDecisionTime(liveGrants: 10_000, samples: 100)
        print("placement decision with 10,000 live grants: median \(median) µs, p99 \(p99) µs")
        #expect(median > 0 && p99 >= median)
    }
}
