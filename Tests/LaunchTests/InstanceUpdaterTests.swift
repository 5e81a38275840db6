import Foundation
import Synchronization
import Testing
import Allocator
@testable import Launch
import MicroVMCore

/// The order of a live resize, on a backend that records what it enforces and what the ledger
/// held at that moment: growth is granted before it is enforced, shrinkage enforced before it
/// is given back, and a failure undoes every step. (Real runtimes: UpdateCLITests.)
@Suite struct InstanceUpdaterTests {
    final class Log: Sendable {
        /// (cpus, memory) enforced, and the ledger's (cpus, memory) when it was.
        let steps = Mutex<[(to: (Int, ByteCount), ledger: (Int, ByteCount))]>([])
        let failOn = Mutex<Int?>(nil)
        let refuse = Mutex(false)
    }

    struct Backend: InstanceBackend {
        var mode: RunMode { .container }
        let log: Log
        let allocator: Allocator
        func execute(_ plan: LaunchPlan) async throws -> RunResult { plan.result(status: 0, output: "", console: "") }
        func checkUpdate(name: String, from: Enforcement, to: Enforcement) throws {
            if log.refuse.withLock({ $0 }) { throw MicroVMError.unsupported("this instance cannot change") }
        }
        func update(name: String, from: Enforcement, to: Enforcement) async throws {
            let g = try #require(try allocator.grants().first { $0.owner == name })
            let n = log.steps.withLock { s in
                s.append(((to.cpus, to.memory), (g.slice.cpus, g.slice.memory)))
                return s.count
            }
            if log.failOn.withLock({ $0 }) == n { throw MicroVMError(.backend, "the runtime refused step \(n)") }
        }
    }

    func fixture() throws -> (Allocator, InstanceUpdater, Log, Backend, String) {
        let dir = NSTemporaryDirectory() + "mvm-upd-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let host = HostCapacity(onlineCPUs: [0, 1, 2, 3], memoryTotal: .gibibytes(4), reservedMemory: .mebibytes(512))
        let a = try Allocator(capacity: host, ledgerPath: dir + "/ledger.sqlite", ownerAlive: { _, _ in true })
        try a.allocate(SliceRequest(cpus: 1, memory: .mebibytes(512), owner: "c1", ownerPID: 100, mode: "container"))
        let log = Log()
        return (a, InstanceUpdater(allocator: a), log, Backend(log: log, allocator: a), dir)
    }

    func grant(_ a: Allocator) throws -> (Int, ByteCount) {
        let g = try #require(try a.grants().first { $0.owner == "c1" })
        return (g.slice.cpus, g.slice.memory)
    }

    @Test func growthIsGrantedFirstAndShrinkageGivenBackLast() async throws {
        let (a, updater, log, backend, dir) = try fixture()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let g = try await updater.update(name: "c1", .init(cpus: 2, memory: .mebibytes(256)), on: backend)
        #expect(g.slice.cpus == 2 && g.slice.memory == .mebibytes(256))
        let steps = log.steps.withLock { $0 }
        #expect(steps.count == 2)
        // Step 1: the second CPU is in the ledger when it is enforced; the memory not yet lowered.
        #expect(steps[0].to == (2, .mebibytes(512)) && steps[0].ledger == (2, .mebibytes(512)))
        // Step 2: the memory is lowered while the ledger still holds the old size.
        #expect(steps[1].to == (2, .mebibytes(256)) && steps[1].ledger == (2, .mebibytes(512)))
        #expect(try grant(a) == (2, .mebibytes(256)))
    }

    @Test func aFailedShrinkUndoesTheGrowthBeforeIt() async throws {
        let (a, updater, log, backend, dir) = try fixture()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        log.failOn.withLock { $0 = 2 }
        await #expect(throws: MicroVMError.self) { try await updater.update(name: "c1", .init(cpus: 2, memory: .mebibytes(256)), on: backend) }
        let steps = log.steps.withLock { $0 }
        #expect(steps.count == 3 && steps[2].to == (1, .mebibytes(512)), "the instance is put back as it was: \(steps)")
        #expect(try grant(a) == (1, .mebibytes(512)))
    }

    @Test func aFailedGrowthGivesTheGrantBack() async throws {
        let (a, updater, log, backend, dir) = try fixture()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        log.failOn.withLock { $0 = 1 }
        await #expect(throws: MicroVMError.self) { try await updater.update(name: "c1", .init(memory: .gibibytes(1)), on: backend) }
        #expect(try grant(a) == (1, .mebibytes(512)))
        #expect(try a.usage().memoryUsed == .mebibytes(512))
    }

    @Test func aRefusalChangesNothing() async throws {
        let (a, updater, log, backend, dir) = try fixture()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        log.refuse.withLock { $0 = true }
        await #expect(throws: MicroVMError.self) { try await updater.update(name: "c1", .init(cpus: 2), on: backend) }
        log.refuse.withLock { $0 = false }
        let tooBig = await #expect(throws: MicroVMError.self) { try await updater.update(name: "c1", .init(memory: .gibibytes(8)), on: backend) }
        #expect(tooBig?.code == .invalidArgument || tooBig?.code == .insufficientResources)
        let unchanged = try grant(a)
        #expect(log.steps.withLock { $0.isEmpty } && unchanged == (1, .mebibytes(512)))
    }
}
