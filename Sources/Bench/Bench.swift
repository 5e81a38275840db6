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
    public init(scenarios: [any BenchScenario], targets: [BenchTarget], repeats: Int, context: BenchContext, preset: String = "custom",
                profile: String = "bench", emulatedVMRepeats: Int? = nil) {
        self.scenarios = scenarios; self.targets = targets; self.repeats = max(1, repeats); self.context = context
        self.preset = preset; self.profile = profile; self.emulatedVMRepeats = emulatedVMRepeats.map { max(1, $0) }
    }

    public func repeats(for t: BenchTarget) -> Int {
        let vm = t.record.mode == .hosted || t.record.mode == .direct
        if vm, t.record.acceleration != "hardware KVM", let n = emulatedVMRepeats { return min(n, repeats) }
        return repeats
    }
}

/// Runs a plan and assembles the report. Failures become labelled cells, never missing ones.
public final class BenchRunner: Sendable {
    public let plan: BenchPlan
    let progress: @Sendable (String) -> Void

    public init(plan: BenchPlan, progress: @escaping @Sendable (String) -> Void = { _ in }) {
        self.plan = plan; self.progress = progress
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
        let ctx = plan.context
        let totalRuns = plan.scenarios.reduce(0) { acc, s in
            acc + plan.targets.filter { $0.backend != nil }.reduce(0) { $0 + plan.repeats(for: $1) } * s.runsPerMeasure(ctx)
        }
        var doneRuns = 0
        let start = Date()
        var estimate = ProgressEstimate()
        for t in plan.targets where t.backend != nil {
            estimate.planned[t.name] = plan.scenarios.reduce(0) { $0 + plan.repeats(for: t) * $1.runsPerMeasure(ctx) }
        }
        var cells: [Cell] = []
        for scenario in plan.scenarios {
            var metrics: [Metric] = []
            for m in scenario.metrics(for: ctx) where !metrics.contains(m) { metrics.append(m) }
            for target in plan.targets {
                var samples: [String: [Double]] = [:], details: [String: [[String: String]]] = [:]
                var unavailable: [String: String] = [:], errors: [String] = []
                var seen = metrics
                if target.backend == nil {
                    for m in metrics { unavailable[m.id] = target.record.unavailableReason ?? "backend not available" }
                } else {
                    let repeats = plan.repeats(for: target)
                    for rep in 1...repeats {
                        progress(progressLine(scenario: scenario.name, target: target.name, rep: rep, of: repeats, done: doneRuns, total: totalRuns,
                                              start: start, left: estimate.secondsLeft()))
                        let began = Date()
                        defer { estimate.record(target.name, runs: scenario.runsPerMeasure(ctx), seconds: Date().timeIntervalSince(began)) }
                        do {
                            for m in try await scenario.measure(target, ctx) {
                                if !seen.contains(m.metric) { seen.append(m.metric) }
                                if let why = m.unavailable { unavailable[m.metric.id] = why; continue }
                                samples[m.metric.id, default: []].append(m.value)
                                details[m.metric.id, default: []].append(m.details)
                            }
                        } catch let u as ScenarioUnavailable {
                            for m in metrics { unavailable[m.id] = u.reason }
                            doneRuns += scenario.runsPerMeasure(ctx) * (repeats - rep + 1)
                            estimate.skip(target.name, runs: scenario.runsPerMeasure(ctx) * (repeats - rep))
                            break
                        } catch {
                            errors.append("repeat \(rep): \(error)")
                        }
                        doneRuns += scenario.runsPerMeasure(ctx)
                    }
                }
                for m in seen {
                    let s = samples[m.id] ?? []
                    let status: Cell.Status = !s.isEmpty ? .ok : (unavailable[m.id] != nil ? .unavailable : .failed)
                    let note = status == .unavailable ? unavailable[m.id] : (status == .failed ? errors.last : scenario.note)
                    cells.append(Cell(scenario: scenario.name, metric: m.id, title: m.title, unit: m.unit, higherIsBetter: m.higherIsBetter,
                                      backend: target.name, status: status, note: note, samples: s, details: details[m.id] ?? [], errors: errors))
                }
            }
        }
        progress("[bench] done: \(doneRuns) instance runs in \(Self.duration(Date().timeIntervalSince(start)))")
        let config = RunConfigRecord(preset: plan.preset, repeats: plan.repeats, scenarios: plan.scenarios.map(\.name), profile: plan.profile,
                                     slice: ctx.slice, workload: ctx.workload.source, guestKernel: ctx.workload.kernelVersion,
                                     durations: ctx.durations.asDictionary,
                                     repeatsByBackend: Dictionary(uniqueKeysWithValues: plan.targets.map { ($0.name, plan.repeats(for: $0)) }))
        return BenchReport(host: hostRecord, config: config, backends: plan.targets.map(\.record), cells: Self.withRatios(cells))
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
