/// Bench: an honest, repeatable measurement of what VM and container isolation cost and protect
/// against. A matrix of scenarios × backends, every instance with the same slice and the same
/// workload binaries, each cell repeated and reported as median, p99 and spread, and as a ratio to
/// native measured in the same run; results as versioned JSON, Markdown and SVG charts.
///
/// ```swift
/// let host = HostProfile.current()
/// let targets = BackendCatalog.targets(["native", "runc"], host: host, factories: [:])
/// let runner = BenchRunner(plan: BenchPlan(scenarios: Scenarios.all, targets: targets, repeats: 3,
///                                          context: BenchContext(workload: .host, slice: slice, durations: .quick)))
/// let report = await runner.run(host: host)
/// try BenchOutput.write(report, to: "bench-results")
/// ```
import Foundation
import MicroVMCore
import Host

/// What to run: scenarios × targets, each cell `repeats` times after one discarded warm-up.
public struct BenchPlan: Sendable {
    public var scenarios: [any BenchScenario]
    public var targets: [BenchTarget]
    public var repeats: Int
    public var context: BenchContext
    public var preset: String
    public var profile: String
    /// Repeats for VMs that are emulated (TCG or a software KVM), where each boot costs seconds:
    /// `--quick` trades their sample count for a run that ends in minutes (recorded per backend).
    public var emulatedVMRepeats: Int?
    /// When set, emulated VMs run only these scenarios, starts one at a time (`--quick`): the
    /// others would cost a boot each, a minute or more of TCG on a small host.
    public var emulatedVMScenarios: [String]?
    /// At most this many repeats for the named scenarios (`--quick`: the noisy-neighbour runs
    /// several instances per repeat and measures containment, which one repeat shows).
    public var scenarioRepeatCap: [String: Int] = [:]
    /// Scenarios that get no warm-up run, with why (recorded in their cells).
    public var warmupSkipped: [String: String] = [:]
    /// Which of this process's new descendants a timed-out cell may have left: all of them in
    /// `mvm bench` (cells run one at a time); narrower where other work shares the process.
    public var leftoverFilter: @Sendable (Int32) -> Bool = { _ in true }
    public init(scenarios: [any BenchScenario], targets: [BenchTarget], repeats: Int, context: BenchContext, preset: String = "custom",
                profile: String = "bench", emulatedVMRepeats: Int? = nil, emulatedVMScenarios: [String]? = nil) {
        self.scenarios = scenarios; self.targets = targets; self.repeats = max(1, repeats); self.context = context
        self.preset = preset; self.profile = profile; self.emulatedVMRepeats = emulatedVMRepeats.map { max(1, $0) }
        self.emulatedVMScenarios = emulatedVMScenarios
    }

    /// A VM without real KVM: every boot costs seconds, so presets give it fewer repeats.
    public static func isEmulatedVM(_ t: BenchTarget) -> Bool {
        t.record.mode.isVM && !BackendCatalog.realKVM.contains(t.record.acceleration)
    }

    /// The context a target's cells run with.
    public func context(for t: BenchTarget) -> BenchContext {
        var c = context
        if emulatedVMScenarios != nil, Self.isEmulatedVM(t) { c.serialStartsOnly = true }
        return c
    }

    /// Why a scenario is left out for a target in this plan (nil: it runs).
    public func skipReason(_ s: any BenchScenario, _ t: BenchTarget) -> String? {
        let missing = context.workload.missing(s.tools)
        if !missing.isEmpty {
            return "the workload (\(context.workload.source)) has no \(missing.joined(separator: ", ")): run an image that has \(missing.count == 1 ? "it" : "them"), or the default image"
        }
        guard let only = emulatedVMScenarios, Self.isEmulatedVM(t), !only.contains(s.name) else { return nil }
        return "not measured in --quick for emulated VMs (\(t.record.acceleration): each boot costs many seconds); run --full"
    }

    /// How long one repeat of a cell may take before it is abandoned: every instance it starts
    /// may use its whole timeout (the parallel ones at once), plus time to set up and tear down.
    public func cellDeadline(_ s: any BenchScenario, _ t: BenchTarget) -> Double {
        let c = context(for: t)
        return c.durations.instanceTimeout * Double(max(1, s.runsPerMeasure(c))) + c.durations.cellMargin
    }

    public func repeats(for t: BenchTarget, scenario: String) -> Int {
        min(repeats(for: t), max(1, scenarioRepeatCap[scenario] ?? Int.max))
    }

    public func repeats(for t: BenchTarget) -> Int {
        if Self.isEmulatedVM(t), let n = emulatedVMRepeats { return min(n, repeats) }
        return repeats
    }

    /// Warm-up runs of a scenario on a target: one, unless the plan skips it.
    public func warmups(_ s: any BenchScenario) -> Int { warmupSkipped[s.name] == nil ? 1 : 0 }
}

extension Measurement {
    /// A metric this repeat could not measure (a victim that died, an aggressor that never ran):
    /// the runner records `reason` as the repeat's failure, never a number.
    public static func failed(_ metric: Metric, _ reason: String, details: [String: String] = [:]) -> Measurement {
        var d = details
        d["failure"] = reason
        return Measurement(metric, .nan, details: d)
    }

    /// Why this measurement is not a sample: a non-finite value is a failure, with its reason.
    var failure: String? {
        guard unavailable == nil, !value.isFinite else { return nil }
        return details["failure"] ?? "no finite value (\(value))"
    }
}

/// Runs a plan and assembles the report. Failures become labelled cells, never missing ones,
/// and never numbers.
///
/// Repeats are interleaved: for each scenario every backend gets its warm-up, then repeat 1 on
/// every backend, then repeat 2, and so on, each round starting one backend further on. The
/// machine drifts over minutes (other tenants, thermal and frequency state); interleaving spreads
/// that drift over all backends alike, so it cancels in ratios to native instead of reading as a
/// difference between backends.
public final class BenchRunner: Sendable {
    public let plan: BenchPlan
    let progress: @Sendable (String) -> Void
    let checkpoint: @Sendable (BenchReport) -> Void

    /// `checkpoint` gets the report so far after every round, so a run that is killed keeps what it measured.
    public init(plan: BenchPlan, progress: @escaping @Sendable (String) -> Void = { _ in },
                checkpoint: @escaping @Sendable (BenchReport) -> Void = { _ in }) {
        self.plan = plan; self.progress = progress; self.checkpoint = checkpoint
    }

    /// The host as the results file records it.
    public static func hostRecord(_ h: HostProfile) -> HostRecord {
        HostRecord(cpuModel: h.cpuModel, cores: h.onlineCPUs.count, kernel: h.kernel, memory: h.memoryTotal,
                   kvm: h.kvm.verdict.rawValue, kvmReason: h.kvm.reason, cgroupMode: h.cgroupMode.rawValue)
    }

    public func run(host: HostProfile) async -> BenchReport {
        await run(hostRecord: Self.hostRecord(host))
    }

    public func run(hostRecord: HostRecord) async -> BenchReport {
        let runnable = plan.targets.filter { $0.backend != nil || plan.scenarios.contains { !$0.needsBackend } }
        func runs(_ s: any BenchScenario, _ t: BenchTarget) -> Int {
            plan.skipReason(s, t) != nil || (t.backend == nil && s.needsBackend) ? 0 : (plan.repeats(for: t, scenario: s.name) + plan.warmups(s)) * s.runsPerMeasure(plan.context(for: t))
        }
        var estimate = ProgressEstimate()
        for t in runnable { estimate.planned[t.name] = plan.scenarios.reduce(0) { $0 + runs($1, t) } }
        var clock = RunClock(total: plan.scenarios.reduce(0) { acc, s in acc + runnable.reduce(0) { $0 + runs(s, $1) } }, estimate: estimate)
        var cells: [Cell] = []
        for scenario in plan.scenarios {
            var tallies = plan.targets.map { CellTally(scenario: scenario, target: $0, plan: plan) }
            let live = tallies.indices.filter { tallies[$0].open }
            if plan.warmups(scenario) > 0 {
                for i in live { await measure(&tallies[i], rep: 0, clock: &clock) }
            } else {
                for i in live { tallies[i].skipWarmup(plan.warmupSkipped[scenario.name] ?? "") }
            }
            let rounds = live.map { tallies[$0].repeats }.max() ?? 0
            if rounds > 0 {
                for rep in 1...rounds where tallies.contains(where: \.open) {
                    // Each round starts one backend further on, so no backend always follows the same one.
                    let order = live.indices.map { live[($0 + rep - 1) % live.count] }
                    for i in order where tallies[i].open && rep <= tallies[i].repeats { await measure(&tallies[i], rep: rep, clock: &clock) }
                    checkpoint(report(hostRecord, cells + tallies.flatMap { $0.cells() }))
                }
            }
            cells += tallies.flatMap { $0.cells() }
            checkpoint(report(hostRecord, cells))
        }
        progress("[bench] done: \(clock.done) instance runs in \(Self.duration(Date().timeIntervalSince(clock.start)))")
        return report(hostRecord, cells)
    }

    /// One run of a scenario on a target: repeat `rep`, or the warm-up when `rep` is 0.
    func measure(_ tally: inout CellTally, rep: Int, clock: inout RunClock) async {
        let scenario = tally.scenario, target = tally.target, ctx = tally.context
        let perMeasure = scenario.runsPerMeasure(ctx)
        let which = rep == 0 ? "warm-up (discarded)" : "repeat \(rep)/\(tally.repeats)"
        progress(progressLine(scenario: scenario.name, target: target.name, which: which, clock: clock))
        let began = Date()
        defer { clock.estimate.record(target.name, runs: perMeasure, seconds: Date().timeIntervalSince(began)) }
        do {
            let measured = try await Watchdog.run(seconds: plan.cellDeadline(scenario, target),
                                                  cleanup: { await Self.stopLeftovers(target) }, owned: plan.leftoverFilter) {
                try await scenario.measure(target, ctx)
            }
            tally.record(measured, rep: rep)
            clock.done += perMeasure
        } catch let u as ScenarioUnavailable {
            let left = tally.remainingRuns(after: rep) * perMeasure
            clock.done += perMeasure + left
            clock.estimate.skip(target.name, runs: left)
            tally.unavailable(u.reason)
        } catch let t as Watchdog.TimedOut {
            // A cell that hung once will hang again: its remaining repeats are not tried.
            progress("[bench] \(scenario.name) on \(target.name): \(t)")
            let left = tally.remainingRuns(after: rep) * perMeasure
            clock.done += perMeasure + left
            clock.estimate.skip(target.name, runs: left)
            tally.timedOut("\(t)", rep: rep)
        } catch {
            tally.failed("\(error)", rep: rep)
            clock.done += perMeasure
        }
    }

    func report(_ hostRecord: HostRecord, _ cells: [Cell]) -> BenchReport {
        let ctx = plan.context
        let config = RunConfigRecord(preset: plan.preset, repeats: plan.repeats, scenarios: plan.scenarios.map(\.name), profile: plan.profile,
                                     slice: ctx.slice, workload: ctx.workload.source, guestKernel: ctx.workload.kernelVersion,
                                     durations: ctx.durations.asDictionary,
                                     repeatsByBackend: Dictionary(uniqueKeysWithValues: plan.targets.map { ($0.name, plan.repeats(for: $0)) }),
                                     order: "interleaved")
        let usage = ctx.slices.usage()
        let backends = plan.targets.map { t -> BackendRecord in
            var r = t.record
            r.slices = usage[t.name]
            return r
        }
        return BenchReport(host: hostRecord, config: config, backends: backends, cells: Self.withRatios(cells))
    }

    /// Stops the bench's own instances a timed-out cell left on the backend.
    static func stopLeftovers(_ target: BenchTarget) async {
        guard let backend = target.backend else { return }
        _ = try? await Watchdog.run(seconds: 20) {
            for i in (try? await backend.list()) ?? [] where i.name.hasPrefix("bench-") {
                try? await backend.stop(name: i.name)
            }
        }
    }

    /// Fills each `ok` cell's ratio to the `ok` native cell of the same metric in the same run.
    public static func withRatios(_ cells: [Cell], baseline: String = "native") -> [Cell] {
        cells.map { c in
            var c = c
            c.ratioToNative = nil
            if c.status == .ok, let base = cells.first(where: { $0.backend == baseline && $0.scenario == c.scenario && $0.metric == c.metric }),
               base.status == .ok {
                c.ratioToNative = Statistics.ratio(c.samples, to: base.samples)
            }
            return c
        }
    }

    func progressLine(scenario: String, target: String, which: String, clock: RunClock) -> String {
        let elapsed = Date().timeIntervalSince(clock.start)
        let left = clock.estimate.secondsLeft().map(Self.duration) ?? "?"
        return "[bench] \(scenario) on \(target), \(which) — \(clock.done)/\(clock.total) instance runs done, \(Self.duration(elapsed)) elapsed, ~\(left) left"
    }

    static func duration(_ s: Double) -> String {
        let t = Int(s.rounded())
        return t >= 60 ? "\(t / 60)m\(String(format: "%02d", t % 60))s" : "\(t)s"
    }
}

/// Where the run is: instance runs done of the total, since when, and the pace per backend.
struct RunClock {
    var total: Int
    var done = 0
    let start = Date()
    var estimate: ProgressEstimate
    init(total: Int, estimate: ProgressEstimate) { self.total = total; self.estimate = estimate }
}

/// What the repeats of one scenario on one target gave so far, per metric: samples with the
/// repeat they came from, failures with their reasons, and what the warm-up saw.
struct CellTally {
    let scenario: any BenchScenario
    let target: BenchTarget
    let context: BenchContext
    let repeats: Int
    let warmups: Int
    /// Why no run happens (no backend, left out by the plan, or the scenario said so).
    private(set) var unavailableReason: String?
    private(set) var open: Bool
    private var metrics: [Metric]
    private var samples: [String: [Double]] = [:]
    private var sampleRepeats: [String: [Int]] = [:]
    private var details: [String: [[String: String]]] = [:]
    private var succeeded: [String: Set<Int>] = [:]
    private var failures: [String: [String]] = [:]
    /// Metrics the scenario reported unavailable in some repeat, with why.
    private var metricUnavailable: [String: String] = [:]
    private var attempted = 0
    private var warmup: [String: Cell.Warmup] = [:]

    init(scenario: any BenchScenario, target: BenchTarget, plan: BenchPlan) {
        self.scenario = scenario; self.target = target
        context = plan.context(for: target)
        repeats = plan.repeats(for: target, scenario: scenario.name)
        warmups = plan.warmups(scenario)
        var ms: [Metric] = []
        for m in scenario.metrics(for: context) where !ms.contains(m) { ms.append(m) }
        metrics = ms
        if target.backend == nil && scenario.needsBackend {
            unavailableReason = target.record.unavailableReason ?? "backend not available"
        } else {
            unavailableReason = plan.skipReason(scenario, target)
        }
        open = unavailableReason == nil
    }

    /// Runs still planned after `rep` (0 is the warm-up).
    func remainingRuns(after rep: Int) -> Int { max(0, repeats - rep) }

    mutating func record(_ measured: [Measurement], rep: Int) {
        if rep == 0 {
            for m in measured {
                see(m.metric)
                var w = warmup[m.metric.id] ?? Cell.Warmup()
                if let f = m.failure { w.failure = f } else if m.unavailable == nil { w.samples.append(m.value) }
                warmup[m.metric.id] = w
            }
            return
        }
        attempted = rep
        // A repeat succeeds for a metric when it gave samples and no failure: one failed launch
        // among parallel ones makes the others' numbers suspect, so none of them count.
        var got: [String: [Measurement]] = [:], failed: [String: String] = [:], unavailableNow: [String: String] = [:]
        for m in measured {
            see(m.metric)
            if let why = m.unavailable { unavailableNow[m.metric.id] = why } else if let why = m.failure { failed[m.metric.id] = why } else { got[m.metric.id, default: []].append(m) }
        }
        for m in metrics {
            if let why = failed[m.id] {
                failures[m.id, default: []].append("repeat \(rep): \(why)")
            } else if let ms = got[m.id] {
                samples[m.id, default: []] += ms.map(\.value)
                sampleRepeats[m.id, default: []] += ms.map { _ in rep }
                details[m.id, default: []] += ms.map(\.details)
                succeeded[m.id, default: []].insert(rep)
            } else if let why = unavailableNow[m.id] {
                metricUnavailable[m.id] = why
                failures[m.id, default: []].append("repeat \(rep): unavailable: \(why)")
            } else {
                failures[m.id, default: []].append("repeat \(rep): no value reported")
            }
        }
    }

    mutating func failed(_ why: String, rep: Int) {
        if rep == 0 {
            for m in metrics { warmup[m.id] = Cell.Warmup(failure: why) }
            return
        }
        attempted = rep
        for m in metrics { failures[m.id, default: []].append("repeat \(rep): \(why)") }
    }

    mutating func timedOut(_ why: String, rep: Int) {
        failed(why, rep: rep)
        let which = rep == 0 ? "the warm-up" : "repeat \(rep)"
        if rep < repeats {
            for r in (rep + 1)...repeats {
                for m in metrics { failures[m.id, default: []].append("repeat \(r): not run: \(which) \(why)") }
            }
        }
        attempted = repeats
        open = false
    }

    mutating func unavailable(_ why: String) {
        unavailableReason = why
        open = false
    }

    mutating func skipWarmup(_ why: String) {
        for m in metrics { warmup[m.id] = Cell.Warmup(failure: "skipped: " + why) }
    }

    private mutating func see(_ m: Metric) {
        if !metrics.contains(m) { metrics.append(m) }
    }

    /// The cells as they stand: one per metric.
    func cells() -> [Cell] {
        metrics.map { m in
            func cell(_ status: Cell.Status, note: String?) -> Cell {
                Cell(scenario: scenario.name, metric: m.id, title: m.title, unit: m.unit, higherIsBetter: m.higherIsBetter,
                     backend: target.name, status: status, note: note, samples: samples[m.id] ?? [], sampleRepeats: sampleRepeats[m.id] ?? [],
                     details: details[m.id] ?? [], attempts: attempted, successes: succeeded[m.id]?.count ?? 0,
                     failures: failures[m.id] ?? [], warmup: warmup[m.id])
            }
            if let why = unavailableReason, (succeeded[m.id] ?? []).isEmpty { return cell(.unavailable, note: why) }
            let ok = succeeded[m.id]?.count ?? 0
            if ok == 0, let why = metricUnavailable[m.id], (failures[m.id] ?? []).allSatisfy({ $0.contains(": unavailable: ") }) {
                return cell(.unavailable, note: why)
            }
            let status = Cell.status(successes: ok, attempts: attempted)
            switch status {
            case .ok: return cell(.ok, note: scenario.note)
            case .partial:
                return cell(.partial, note: "\(ok) of \(attempted) repeats succeeded, too few for a summary; last failure: " + BenchRunner.failureNote(failures[m.id]?.last ?? "?"))
            default: return cell(.failed, note: failures[m.id]?.last.map(BenchRunner.failureNote))
            }
        }
    }
}

extension BenchRunner {
    /// "repeat N: why" → "why", and a hang reads `failed: timed out after N s`.
    static func failureNote(_ error: String) -> String {
        guard let colon = error.range(of: ": "), error.hasPrefix("repeat ") else { return error }
        return String(error[colon.upperBound...])
    }
}

/// Time left, from each backend's own pace: a TCG boot takes seconds where a container takes
/// milliseconds, so one average over all runs would promise far too little.
struct ProgressEstimate {
    var planned: [String: Int] = [:]
    var done: [String: Int] = [:]
    var seconds: [String: Double] = [:]

    mutating func record(_ backend: String, runs: Int, seconds s: Double) {
        done[backend, default: 0] += runs
        seconds[backend, default: 0] += s
    }

    mutating func skip(_ backend: String, runs: Int) { planned[backend, default: 0] -= runs }

    func secondsLeft() -> Double? {
        let allDone = done.values.reduce(0, +)
        guard allDone > 0 else { return nil }
        let overall = seconds.values.reduce(0, +) / Double(allDone)
        return planned.reduce(0.0) { acc, p in
            let d = done[p.key] ?? 0
            let rate = d > 0 ? (seconds[p.key] ?? 0) / Double(d) : overall
            return acc + Double(max(0, p.value - d)) * rate
        }
    }
}
