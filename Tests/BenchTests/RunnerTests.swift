import Foundation
import Testing
import MicroVMCore
@testable import Bench

/// A scenario that answers from a script: which backends ran in which order, and what each call returns.
struct ScriptedScenario: BenchScenario {
    let name = "scripted"
    static let metric = Metric("value", "Scripted value", unit: "ms", higherIsBetter: false)
    /// Call number (from 0, over all backends), backend and its own call number (0 is its warm-up)
    /// → the value, or nil for a failed run.
    let value: @Sendable (Int, String, Int) -> Double?
    let log = CallLog()
    func metrics(for ctx: BenchContext) -> [Metric] { [Self.metric] }
    func measure(_ target: BenchTarget, _ ctx: BenchContext) async throws -> [Bench.Measurement] {
        let call = log.add(target.name)
        let own = log.all.filter { $0 == target.name }.count - 1
        guard let v = value(call, target.name, own) else { throw MicroVMError(.backend, "scripted failure at call \(call)") }
        return [Bench.Measurement(Self.metric, v)]
    }
}

final class CallLog: @unchecked Sendable {
    private let lock = NSLock()
    private var names: [String] = []
    /// Records a call and returns its number.
    func add(_ name: String) -> Int { lock.withLock { names.append(name); return names.count - 1 } }
    var all: [String] { lock.withLock { names } }
}

func cannedTargets(_ names: [String]) -> [BenchTarget] {
    names.map { BenchTarget(record: BackendRecord(name: $0, mode: .native, acceleration: "none", available: true),
                            backend: CannedBackend(mode: .native, eventsPerSecond: 1)) }
}

@Suite(.timeLimit(.minutes(2)))
struct RunnerTests {
    @Test func repeatsAreInterleavedAfterOneDiscardedWarmupEach() async throws {
        let scenario = ScriptedScenario { call, _, _ in Double(call) }
        let plan = BenchPlan(scenarios: [scenario], targets: cannedTargets(["native", "a", "b"]), repeats: 3,
                             context: BenchContext(workload: .host, slice: Fixtures.slice, durations: .quick))
        let report = await BenchRunner(plan: plan).run(hostRecord: Fixtures.hostRecord)
        // Warm-ups, then round 1 on every backend, round 2 one backend further on, round 3 one more.
        #expect(scenario.log.all == ["native", "a", "b", "native", "a", "b", "a", "b", "native", "b", "native", "a"])
        let a = try #require(report.cell(scenario: "scripted", metric: "value", backend: "a"))
        #expect(a.warmup?.samples == [1])
        #expect(a.samples == [4, 6, 11])
        #expect(a.sampleRepeats == [1, 2, 3])
        #expect(a.attempts == 3 && a.successes == 3 && a.status == .ok)
        #expect(report.config.order == "interleaved")
    }

    /// The machine slows down steadily during the run (+5 % per run): two identical backends must
    /// still come out alike, where back-to-back repeats would put the later one ~25 % behind.
    @Test func driftWithinARunCancelsInRatios() async throws {
        let scenario = ScriptedScenario { call, _, _ in 100 * (1 + 0.05 * Double(call)) }
        let plan = BenchPlan(scenarios: [scenario], targets: cannedTargets(["native", "twin"]), repeats: 5,
                             context: BenchContext(workload: .host, slice: Fixtures.slice, durations: .quick))
        let report = await BenchRunner(plan: plan).run(hostRecord: Fixtures.hostRecord)
        let twin = try #require(report.cell(scenario: "scripted", metric: "value", backend: "twin"))
        let native = try #require(report.cell(scenario: "scripted", metric: "value", backend: "native"))
        let ratio = try #require(twin.ratioToNative?.median)
        #expect(abs(ratio - 1) < 0.05, "ratio \(ratio)")
        // The drift was real: the run's last samples are far above its first.
        #expect((native.samples.max() ?? 0) / (native.samples.min() ?? 1) > 1.3)
        let paired = BenchComparison.pairedRatios(twin, native)
        #expect(paired.count == 5 && paired.allSatisfy { abs($0 - 1) < 0.06 }, "\(paired)")
    }

    @Test func tooFewSuccessesGiveNoSummary() async throws {
        // "flaky" fails in 3 of its 5 repeats (its calls in rounds 1, 3 and 5): partial, no median, no ratio.
        // "shaky" fails in 2 of 5: ok, from the three that succeeded, with the two reasons kept.
        let scenario = ScriptedScenario { _, name, mine in
            switch name {
            case "flaky": return [1, 3, 5].contains(mine) ? nil : 10
            case "shaky": return [2, 4].contains(mine) ? nil : 20
            default: return 5
            }
        }
        let plan = BenchPlan(scenarios: [scenario], targets: cannedTargets(["native", "flaky", "shaky"]), repeats: 5,
                             context: BenchContext(workload: .host, slice: Fixtures.slice, durations: .quick))
        let report = await BenchRunner(plan: plan).run(hostRecord: Fixtures.hostRecord)
        let flaky = try #require(report.cell(scenario: "scripted", metric: "value", backend: "flaky"))
        #expect(flaky.status == .partial)
        #expect(flaky.attempts == 5 && flaky.successes == 2)
        #expect(flaky.failures.count == 3 && flaky.failures.allSatisfy { $0.contains("scripted failure") })
        #expect(flaky.failures.map { $0.prefix(9) } == ["repeat 1:", "repeat 3:", "repeat 5:"])
        #expect(flaky.stats == nil && flaky.ratioToNative == nil)
        #expect(flaky.samples == [10, 10])  // kept raw, not summarised
        let shaky = try #require(report.cell(scenario: "scripted", metric: "value", backend: "shaky"))
        #expect(shaky.status == .ok && shaky.successes == 3 && shaky.failures.count == 2)
        #expect(shaky.stats?.median == 20 && shaky.ratioToNative?.median == 4)
        let md = MarkdownReport.render(report)
        #expect(md.contains("partial (2 of 5 repeats, no summary)"))
        #expect(md.contains("[2 of 5 repeats failed]"))
    }

    /// A scenario that reports a failed measurement (as the noisy neighbour does for a dead victim).
    struct VictimScenario: BenchScenario {
        let name = "noisy-neighbour"
        let log = CallLog()
        func metrics(for ctx: BenchContext) -> [Metric] { [NoisyNeighbour.metric(.memoryBomb)] }
        func measure(_ target: BenchTarget, _ ctx: BenchContext) async throws -> [Bench.Measurement] {
            let call = log.add(target.name)
            let v: (eps: Double?, status: String) = call == 2 ? (nil, "victim failed: killed") : (90, "survived")
            return [NoisyNeighbour.outcome(NoisyNeighbour.metric(.memoryBomb), victimAlone: 100, victim: v, aggressorRan: true,
                                           aggressor: "contained", details: [:])]
        }
    }

    @Test func deadVictimIsAFailureNotASlowdown() async throws {
        let plan = BenchPlan(scenarios: [VictimScenario()], targets: cannedTargets(["native"]), repeats: 3,
                             context: BenchContext(workload: .host, slice: Fixtures.slice, durations: .quick))
        let report = await BenchRunner(plan: plan).run(hostRecord: Fixtures.hostRecord)
        let c = try #require(report.cells.first)
        #expect(c.samples == [10, 10])  // repeats 1 and 3; repeat 2's victim died
        #expect(!c.samples.contains(100))
        #expect(c.successes == 2 && c.attempts == 3 && c.status == .ok)
        #expect(c.failures == ["repeat 2: victim died (victim failed: killed); aggressor: contained"])
        #expect(MarkdownReport.render(report).contains("failed: repeat 2: victim died"))
    }

    @Test func noisyNeighbourOutcomes() {
        let m = NoisyNeighbour.metric(.forkBomb)
        let died = NoisyNeighbour.outcome(m, victimAlone: 100, victim: (nil, "victim did not finish its work (status 137)"), aggressorRan: true,
                                          aggressor: "contained: forks refused", details: ["host": "survived"])
        #expect(!died.value.isFinite)
        #expect(died.failure?.hasPrefix("victim died") == true)
        #expect(died.details["host"] == "survived")
        let idle = NoisyNeighbour.outcome(m, victimAlone: 100, victim: (95, "survived"), aggressorRan: false,
                                          aggressor: "did not run: image missing", details: [:])
        #expect(idle.failure == "aggressor did not run: image missing")
        let ok = NoisyNeighbour.outcome(m, victimAlone: 100, victim: (75, "survived"), aggressorRan: true, aggressor: "contained", details: [:])
        #expect(ok.failure == nil && ok.value == 25 && ok.details["victimBeside"] == "75.0")
        // An aggressor without a result is not "contained".
        for a in NoisyNeighbour.Aggressor.allCases {
            let v = NoisyNeighbour.classify(a, result: nil, error: "launch refused", slice: Fixtures.slice)
            #expect(v.contained == nil)
            #expect(v.text == "did not run: launch refused")
        }
    }
}
