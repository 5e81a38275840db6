import Foundation
import MicroVMCore

/// `mvm bench compare A.json B.json`: which cells changed between two runs of the same host.
///
/// The rule, per cell present in both files (docs/bench-schema.md):
/// - Both `ok`: one value per successful repeat (the median of that repeat's samples) on each side.
///   Non-native backends are compared as their per-repeat ratio to native (repeat N of the backend
///   over repeat N of native, measured next to each other in the same interleaved round): the
///   whole machine drifts between runs (±20 % seen on a shared 2-core host), and that drift cancels
///   in the ratio. Native itself — and any cell without an `ok` native cell in both runs — is
///   compared raw, where drift does not cancel, so its changes must also exceed `rawFloorPercent`.
///   Percent metrics (the noisy-neighbour slowdown) are already relative to the victim alone in
///   the same repeat: compared raw, the floor in percentage points.
/// - A cell is `better` or `worse` only when the two-sided Mann–Whitney test (exact for up to
///   `Statistics.exactLimit` values, ties included) gives p < `alpha` AND the medians differ by
///   more than the floor. With fewer than `minSamples` values a side: `too few samples`.
/// - `ok` → `partial`/`failed` and back are verdicts of their own; nothing is dropped.
public enum BenchComparison {
    public struct Options: Sendable {
        /// Smallest change (in % of the before median, or points for % metrics) that may be called a change.
        public var floorPercent = 5.0
        /// The floor for raw comparisons of non-% metrics (native): run-to-run drift must not read as a change.
        public var rawFloorPercent = 25.0
        public var alpha = 0.01
        /// Fewer values a side and no verdict: 5 vs 5 is the smallest design whose exact p can be below 0.01.
        public var minSamples = 5
        public var allowDifferentHosts = false
        public var baseline = "native"
        public init(floorPercent: Double = 5, rawFloorPercent: Double = 25, allowDifferentHosts: Bool = false) {
            self.floorPercent = floorPercent; self.rawFloorPercent = rawFloorPercent; self.allowDifferentHosts = allowDifferentHosts
        }
    }

    public enum Verdict: String, Codable, Sendable {
        case better, worse
        case withinNoise = "within noise"
        case tooFewSamples = "too few samples"
        /// `ok` before, `partial` or `failed` after.
        case nowFailing = "ok → failed"
        /// `partial` or `failed` before, `ok` after.
        case nowOK = "failed → ok"
        /// Unavailable on a side, failed on both, or in one file only.
        case notCompared = "not compared"

        public var isChange: Bool { self == .better || self == .worse }
    }

    /// What a cell was compared on.
    public enum Basis: String, Codable, Sendable {
        case ratioToNative = "ratio to native"
        case raw
        case none
    }

    public struct Change: Codable, Sendable, Equatable {
        public var scenario: String
        public var metric: String
        public var backend: String
        public var unit: String
        public var beforeStatus: Cell.Status?
        public var afterStatus: Cell.Status?
        /// Raw medians, for reading; the verdict comes from `basis`.
        public var before: Double?
        public var after: Double?
        /// Raw median change in %.
        public var changePercent: Double?
        public var basis: Basis
        /// The change the verdict tested: % of the before median of `basis` values (points for % metrics).
        public var effect: Double?
        public var p: Double?
        /// Values tested each side (one per successful repeat).
        public var counts: [Int]
        public var verdict: Verdict
        /// Why this verdict, in words.
        public var reason: String
    }

    /// Refuses reports from different machines: their numbers differ for reasons no test here sees.
    public static func checkSameHost(_ a: HostRecord, _ b: HostRecord) throws {
        var diffs: [String] = []
        if a.cpuModel != b.cpuModel { diffs.append("CPU '\(a.cpuModel)' vs '\(b.cpuModel)'") }
        if a.cores != b.cores { diffs.append("\(a.cores) vs \(b.cores) cores") }
        if a.kernel != b.kernel { diffs.append("kernel \(a.kernel) vs \(b.kernel)") }
        if a.memory != b.memory { diffs.append("memory \(a.memory) vs \(b.memory)") }
        guard diffs.isEmpty else {
            throw MicroVMError.invalidArgument("the two results come from different hosts (\(diffs.joined(separator: "; "))): their numbers are not comparable; rerun both on one host, or pass --allow-different-hosts to compare anyway")
        }
    }

    public static func compare(_ before: BenchReport, _ after: BenchReport, options: Options = Options()) throws -> [Change] {
        if !options.allowDifferentHosts { try checkSameHost(before.host, after.host) }
        var out: [Change] = []
        for c in after.cells {
            out.append(change(before.cell(scenario: c.scenario, metric: c.metric, backend: c.backend), c, before, after, options))
        }
        for c in before.cells where after.cell(scenario: c.scenario, metric: c.metric, backend: c.backend) == nil {
            out.append(change(c, nil, before, after, options))
        }
        return out
    }

    static func change(_ old: Cell?, _ new: Cell?, _ before: BenchReport, _ after: BenchReport, _ o: Options) -> Change {
        let any = (new ?? old)!
        var ch = Change(scenario: any.scenario, metric: any.metric, backend: any.backend, unit: any.unit, beforeStatus: old?.status,
                        afterStatus: new?.status, before: old?.stats?.median, after: new?.stats?.median, changePercent: nil,
                        basis: .none, effect: nil, p: nil, counts: [], verdict: .notCompared, reason: "")
        if let b = ch.before, let a = ch.after, b != 0 { ch.changePercent = (a - b) / abs(b) * 100 }
        guard let old, let new else {
            ch.reason = old == nil ? "only in the later file" : "only in the earlier file"
            return ch
        }
        let failing: Set<Cell.Status> = [.partial, .failed]
        switch (old.status, new.status) {
        case (.ok, .ok): break
        case (.ok, let s) where failing.contains(s):
            ch.verdict = .nowFailing
            ch.reason = "\(new.successes) of \(new.attempts) repeats succeeded: \(new.note ?? "?")"
            return ch
        case (let s, .ok) where failing.contains(s):
            ch.verdict = .nowOK
            ch.reason = "before: \(old.successes) of \(old.attempts) repeats succeeded"
            return ch
        default:
            ch.reason = "\(old.status.rawValue) before, \(new.status.rawValue) after"
            return ch
        }
        let percentMetric = new.unit == "%"
        var a: [Double], b: [Double], floor: Double, basis: Basis, why: String
        if percentMetric {
            (a, b, floor, basis) = (values(old.perRepeat), values(new.perRepeat), o.floorPercent, .raw)
            why = "already relative to the victim alone in the same repeat; floor \(fmt(floor)) points"
        } else if new.backend != o.baseline, let na = before.cell(scenario: new.scenario, metric: new.metric, backend: o.baseline),
                  let nb = after.cell(scenario: new.scenario, metric: new.metric, backend: o.baseline), na.status == .ok, nb.status == .ok {
            (a, b, floor, basis) = (pairedRatios(old, na), pairedRatios(new, nb), o.floorPercent, .ratioToNative)
            why = "per-repeat ratio to native: run-to-run drift cancels; floor \(fmt(floor)) %"
        } else {
            floor = max(o.floorPercent, o.rawFloorPercent)
            (a, b, basis) = (values(old.perRepeat), values(new.perRepeat), .raw)
            why = (new.backend == o.baseline ? "native is the baseline, so it is compared raw" : "no ok native cell in both runs, so compared raw")
                + ": run-to-run host drift does not cancel; floor \(fmt(floor)) %"
        }
        ch.basis = basis
        ch.counts = [a.count, b.count]
        let d = decide(a, b, floor: floor, points: percentMetric, higherIsBetter: new.higherIsBetter, options: o)
        ch.effect = d.effect; ch.p = d.p; ch.verdict = d.verdict
        ch.reason = d.reason + " (" + why + ")"
        return ch
    }

    /// The verdict on two sets of values: better/worse only with p < alpha and an effect beyond the floor.
    public static func decide(_ a: [Double], _ b: [Double], floor: Double, points: Bool = false, higherIsBetter: Bool,
                              options o: Options = Options()) -> (verdict: Verdict, p: Double?, effect: Double?, reason: String) {
        guard let sa = SampleStats(a), let sb = SampleStats(b) else { return (.tooFewSamples, nil, nil, "no values on a side") }
        let effect: Double? = points ? sb.median - sa.median : (sa.median != 0 ? (sb.median - sa.median) / abs(sa.median) * 100 : nil)
        guard sa.count >= o.minSamples, sb.count >= o.minSamples else {
            return (.tooFewSamples, nil, effect, "\(sa.count) vs \(sb.count) values; at least \(o.minSamples) a side are needed")
        }
        guard let mw = Statistics.mannWhitney(a, b) else { return (.tooFewSamples, nil, effect, "no test") }
        let test = String(format: "Mann–Whitney %@p=%.4f", mw.exact ? "exact " : "", mw.p)
        guard mw.p < o.alpha else { return (.withinNoise, mw.p, effect, "\(test) ≥ \(fmt(o.alpha))") }
        guard let e = effect, abs(e) > floor else {
            let unit = points ? " points" : " %"
            return (.withinNoise, mw.p, effect, "\(test), but the change \(effect.map { fmt($0) + unit } ?? "?") is within the floor")
        }
        let improved = (e > 0) == higherIsBetter
        return (improved ? .better : .worse, mw.p, effect, "\(test) < \(fmt(o.alpha)) and |change| > floor")
    }

    /// Per repeat: the cell's value over native's in the same round, for repeats where both succeeded.
    static func pairedRatios(_ cell: Cell, _ native: Cell) -> [Double] {
        let mine = cell.perRepeat, base = native.perRepeat
        return mine.keys.sorted().compactMap { r in
            guard let v = mine[r], let n = base[r], n != 0 else { return nil }
            return v / n
        }
    }

    static func values(_ perRepeat: [Int: Double]) -> [Double] { perRepeat.keys.sorted().compactMap { perRepeat[$0] } }

    static func fmt(_ v: Double) -> String { String(format: "%.3g", v) }

    public static func markdown(_ changes: [Change], options: Options = Options()) -> String {
        var md = "Called better or worse only when Mann–Whitney p < \(fmt(options.alpha)) and the median moved by more than the floor (\(fmt(options.floorPercent)) %; raw comparisons \(fmt(max(options.floorPercent, options.rawFloorPercent))) %), with at least \(options.minSamples) repeats a side. Non-native backends are compared by their per-repeat ratio to native in the same run.\n\n"
        md += "| scenario | metric | backend | before | after | raw change | basis | tested change | p | verdict | why |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
        for c in changes {
            func v(_ x: Double?) -> String { x.map { MarkdownReport.format($0) + " " + c.unit } ?? "—" }
            let raw = c.changePercent.map { String(format: "%+.1f%%", $0) } ?? "—"
            let eff = c.effect.map { String(format: c.unit == "%" ? "%+.1f pt" : "%+.1f%%", $0) } ?? "—"
            let p = c.p.map { String(format: "%.4f", $0) } ?? "—"
            md += "| \(c.scenario) | \(c.metric) | \(c.backend) | \(v(c.before)) | \(v(c.after)) | \(raw) | \(c.basis.rawValue) | \(eff) | \(p) | \(c.verdict.rawValue) | \(MarkdownReport.escape(c.reason)) |\n"
        }
        return md
    }
}
