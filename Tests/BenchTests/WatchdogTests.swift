import Foundation
import Testing
import MicroVMCore
import ConfigFile
import Allocator
@testable import Bench

/// A scenario that never returns, whatever happens to its task.
struct HangingScenario: BenchScenario {
    let name = "hang"
    static let metric = Metric("hang", "Never ends", unit: "s", higherIsBetter: false)
    func metrics(for ctx: BenchContext) -> [Metric] { [Self.metric] }
    func measure(_ target: BenchTarget, _ ctx: BenchContext) async throws -> [Bench.Measurement] {
        await withUnsafeContinuation { (_: UnsafeContinuation<Void, Never>) in }
        return []
    }
}

@Suite(.timeLimit(.minutes(2)))
struct WatchdogTests {
    @Test func hungCellFailsWithItsDeadlineAndTheRunGoesOn() async throws {
        var d = BenchDurations.quick
        d.instanceTimeout = 1; d.cellMargin = 1
        let targets = [BenchTarget(record: BackendRecord(name: "native", mode: .native, acceleration: "none", available: true),
                                   backend: CannedBackend(mode: .native, eventsPerSecond: 10))]
        var plan = BenchPlan(scenarios: [HangingScenario(), CPUThroughput()], targets: targets, repeats: 3,
                             context: BenchContext(workload: .host, slice: Fixtures.slice, durations: d))
        // Other suites run instances from this process at the same time: their processes are not this cell's.
        plan.leftoverFilter = { _ in false }
        let counter = Counter()
        let report = await BenchRunner(plan: plan, checkpoint: { r in counter.add(r.cells.count) }).run(hostRecord: Fixtures.hostRecord)
        let hang = try #require(report.cell(scenario: "hang", metric: "hang", backend: "native"))
        #expect(hang.status == .failed)
        // The warm-up hung: it is recorded as such, and every repeat reads as not run because of it.
        #expect(hang.warmup?.failure?.hasPrefix("timed out after 2 s") == true, "\(String(describing: hang.warmup))")
        #expect(hang.note?.contains("the warm-up timed out after 2 s") == true, "\(hang.note ?? "")")
        // A cell that hung is not retried: its planned repeats are failures, none of them run.
        #expect(hang.attempts == 3 && hang.successes == 0)
        #expect(hang.failures.count == 3 && hang.failures.allSatisfy { $0.contains("not run") })
        #expect(hang.stats == nil && hang.samples.isEmpty)
        #expect(report.cell(scenario: "cpu", metric: "sysbench-cpu", backend: "native")?.status == .ok)
        // A checkpoint after each round: the first holds only the hung cell, the rest add the cpu cell.
        #expect(counter.values.first == 1)
        #expect(counter.values.dropFirst().allSatisfy { $0 == 2 } && counter.values.count == 5, "\(counter.values)")
    }

    @Test(.enabled(if: ProcessRunner.which("sleep") != nil, "needs sleep(1)"))
    func timedOutBodyHasItsProcessesKilled() async throws {
        let marker = "\(Int.random(in: 100_000...999_999))"
        let pid = Once<Int32>()
        await #expect(throws: Watchdog.TimedOut.self) {
            try await Watchdog.run(seconds: 1, owned: { p in ProcessMemory.table()[p]?.cmdline.contains(marker) ?? false }) {
                let p = Process()
                p.executableURL = URL(fileURLWithPath: ProcessRunner.which("sleep") ?? "/bin/sleep")
                p.arguments = [marker]  // seconds to sleep, and what tells this process from others
                try p.run()
                pid.set(p.processIdentifier)
                p.waitUntilExit()
                return p.terminationStatus
            }
        }
        let child = try #require(pid.value)
        // Gone, or a zombie waiting to be reaped: either way no longer running.
        var running = false
        for _ in 0..<20 {
            let stat = (try? String(contentsOfFile: "/proc/\(child)/stat", encoding: .utf8)) ?? ""
            running = !stat.isEmpty && !stat.contains(") Z ")
            if !running { break }
            try await Task.sleep(nanoseconds: 100_000_000)
        }
        #expect(!running, "sleep \(marker) (pid \(child)) still runs after the deadline")
    }
}

@Suite(.enabled(if: getuid() == 0, "the allocator probes cgroups and writes its ledger: needs root"))
struct SliceSourceTests {
    @Test func grantsEachInstanceAndFallsBackToSharedWhenRefused() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mvm-bench-alloc-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let paths = Paths(state: dir, cache: dir + "/cache")
        let source = try SliceSource(allocator: Allocator.open(paths: paths, config: MicroVMConfig.parse(MicroVMConfig.builtinDefault)))
        let small = ResourceSlice(cpus: 1, placement: .shared, memory: .mebibytes(64))
        let a = source.lease(small, owner: "bench-a", mode: .native, backend: "native")
        #expect(a.slice.cpus == 1)
        a.release()
        let huge = ResourceSlice(cpus: 4096, placement: .dedicated, cpuSet: [0], memory: .mebibytes(64))
        let b = source.lease(huge, owner: "bench-b", mode: .native, backend: "native")
        #expect(b.slice.placement == .shared)
        #expect(b.slice.cpuSet.isEmpty)
        let usage = try #require(source.usage()["native"])
        #expect(usage.keys.contains { $0.hasPrefix("granted shared 1 CPU") }, "\(usage)")
        #expect(usage.keys.contains { $0.contains("allocator refused") }, "\(usage)")
    }
}

final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: [Int] = []
    var values: [Int] { lock.withLock { stored } }
    func add(_ v: Int) { lock.withLock { stored.append(v) } }
}
