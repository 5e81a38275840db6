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

/// What to run: scenarios × targets, each cell `repeats` times.
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
    /// Which of this process's new descendants a timed-out cell may have left: all of them in
    /// `mvm bench` (cells run one at a time); narrower where other work shares the process.
    public var leftoverFilter: @Sendable (Int32) -> Bool = { _ in true }
    public init(scenarios: [any BenchScenario], targets: [BenchTarget], repeats: Int, context: BenchContext, preset: String = "custom",
                profile: String = "bench", emulatedVMRepeats: Int? = nil, emulatedVMScenarios: [String]? = nil) {
        self.scenarios = scenarios; self.targets = targets; self.repeats = max(1, repeats); self.context = context
        self.preset = preset; self.profile = profile; self.emulatedVMRepeats = emulatedVMRepeats.map { max(1, $0) }
        self.emulatedVMScenarios = emulatedVMScenarios
    }

    static func isEmulatedVM(_ t: BenchTarget) -> Bool {
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
}

/// Runs a plan and assembles the report. Failures become labelled cells, never missing ones.
public final class BenchRunner: Sendable {
    public let plan: BenchPlan
    let progress: @Sendable (String) -> Void
    let checkpoint: @Sendable (BenchReport) -> Void

    /// `checkpoint` gets the report so far after every cell, so a run that is killed keeps what it measured.
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
        let runnable = plan.targets.filter { $0.backend != nil }
        func runs(_ s: any BenchScenario, _ t: BenchTarget) -> Int {
            plan.skipReason(s, t) != nil ? 0 : plan.repeats(for: t, scenario: s.name) * s.runsPerMeasure(plan.context(for: t))
        }
        let totalRuns = plan.scenarios.reduce(0) { acc, s in acc + runnable.reduce(0) { $0 + runs(s, $1) } }
        var doneRuns = 0
        let start = Date()
        var estimate = ProgressEstimate()
        for t in runnable { estimate.planned[t.name] = plan.scenarios.reduce(0) { $0 + runs($1, t) } }
        var cells: [Cell] = []
        for scenario in plan.scenarios {
            for target in plan.targets {
                let ctx = plan.context(for: target)
                var metrics: [Metric] = []
                for m in scenario.metrics(for: ctx) where !metrics.contains(m) { metrics.append(m) }
                var samples: [String: [Double]] = [:], details: [String: [[String: String]]] = [:]
                var unavailable: [String: String] = [:], errors: [String] = []
                var seen = metrics
                if target.backend == nil {
                    for m in metrics { unavailable[m.id] = target.record.unavailableReason ?? "backend not available" }
                } else if let why = plan.skipReason(scenario, target) {
                    for m in metrics { unavailable[m.id] = why }
                } else {
                    let repeats = plan.repeats(for: target, scenario: scenario.name)
                    let perMeasure = scenario.runsPerMeasure(ctx)
                    for rep in 1...repeats {
                        progress(progressLine(scenario: scenario.name, target: target.name, rep: rep, of: repeats, done: doneRuns, total: totalRuns,
                                              start: start, left: estimate.secondsLeft()))
                        let began = Date()
                        defer { estimate.record(target.name, runs: perMeasure, seconds: Date().timeIntervalSince(began)) }
                        do {
                            let measured = try await Watchdog.run(seconds: plan.cellDeadline(scenario, target),
                                                                  cleanup: { await Self.stopLeftovers(target) }, owned: plan.leftoverFilter) {
                                try await scenario.measure(target, ctx)
                            }
                            for m in measured {
                                if !seen.contains(m.metric) { seen.append(m.metric) }
                                if let why = m.unavailable { unavailable[m.metric.id] = why; continue }
                                samples[m.metric.id, default: []].append(m.value)
                                details[m.metric.id, default: []].append(m.details)
                            }
                        } catch let u as ScenarioUnavailable {
                            for m in metrics { unavailable[m.id] = u.reason }
                            doneRuns += perMeasure * (repeats - rep + 1)
                            estimate.skip(target.name, runs: perMeasure * (repeats - rep))
                            break
                        } catch let t as Watchdog.TimedOut {
                            // A cell that hung once will hang again: its remaining repeats are not tried.
                            errors.append("repeat \(rep): \(t)")
                            progress("[bench] \(scenario.name) on \(target.name): \(t)")
                            doneRuns += perMeasure * (repeats - rep + 1)
                            estimate.skip(target.name, runs: perMeasure * (repeats - rep))
                            break
                        } catch {
                            errors.append("repeat \(rep): \(error)")
                        }
                        doneRuns += perMeasure
                    }
                }
                for m in seen {
                    let s = samples[m.id] ?? []
                    let status: Cell.Status = !s.isEmpty ? .ok : (unavailable[m.id] != nil ? .unavailable : .failed)
                    let note = status == .unavailable ? unavailable[m.id] : (status == .failed ? errors.last.map(Self.failureNote) : scenario.note)
                    cells.append(Cell(scenario: scenario.name, metric: m.id, title: m.title, unit: m.unit, higherIsBetter: m.higherIsBetter,
                                      backend: target.name, status: status, note: note, samples: s, details: details[m.id] ?? [], errors: errors))
                }
                checkpoint(report(hostRecord, cells))
            }
        }
        progress("[bench] done: \(doneRuns) instance runs in \(Self.duration(Date().timeIntervalSince(start)))")
        return report(hostRecord, cells)
    }

    /// "repeat N: why" → "why", and a hang reads `failed: timed out after N s`.
    static func failureNote(_ error: String) -> String {
        guard let colon = error.range(of: ": "), error.hasPrefix("repeat ") else { return error }
        return String(error[colon.upperBound...])
    }

    func report(_ hostRecord: HostRecord, _ cells: [Cell]) -> BenchReport {
        let ctx = plan.context
        let config = RunConfigRecord(preset: plan.preset, repeats: plan.repeats, scenarios: plan.scenarios.map(\.name), profile: plan.profile,
                                     slice: ctx.slice, workload: ctx.workload.source, guestKernel: ctx.workload.kernelVersion,
                                     durations: ctx.durations.asDictionary,
                                     repeatsByBackend: Dictionary(uniqueKeysWithValues: plan.targets.map { ($0.name, plan.repeats(for: $0)) }))
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

    /// Fills each cell's ratio to the native cell of the same metric in the same run.
    public static func withRatios(_ cells: [Cell], baseline: String = "native") -> [Cell] {
        cells.map { c in
            var c = c
            if let base = cells.first(where: { $0.backend == baseline && $0.scenario == c.scenario && $0.metric == c.metric }),
               !base.samples.isEmpty, !c.samples.isEmpty {
                c.ratioToNative = Statistics.ratio(c.samples, to: base.samples)
            }
            return c
        }
    }

    func progressLine(scenario: String, target: String, rep: Int, of repeats: Int, done: Int, total: Int, start: Date, left seconds: Double?) -> String {
        let elapsed = Date().timeIntervalSince(start)
        let left = seconds.map(Self.duration) ?? "?"
        return "[bench] \(scenario) on \(target), repeat \(rep)/\(repeats) — \(done)/\(total) instance runs done, \(Self.duration(elapsed)) elapsed, ~\(left) left"
    }

    static func duration(_ s: Double) -> String {
        let t = Int(s.rounded())
        return t >= 60 ? "\(t / 60)m\(String(format: "%02d", t % 60))s" : "\(t)s"
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
