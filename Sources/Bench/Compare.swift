import Foundation

/// `mvm bench compare A.json B.json`: each cell's median change and whether it is outside the noise.
public enum BenchComparison {
    public struct Change: Codable, Sendable, Equatable {
        public var scenario: String
        public var metric: String
        public var backend: String
        public var unit: String
        public var before: Double
        public var after: Double
        public var changePercent: Double
        /// True when the change is outside the noise by `method`.
        public var significant: Bool
        /// Whether the change is an improvement (given the metric's direction), when significant.
        public var improved: Bool?
        public var method: String
    }

    public static let alpha = 0.05

    /// The noise decision on raw samples: a Mann–Whitney U test where the sample counts let it
    /// reach the significance level; otherwise the medians must differ by more than the two
    /// samples' combined spread (half of each min–max range). One sample each decides nothing.
    public static func decide(_ a: [Double], _ b: [Double]) -> (significant: Bool, method: String) {
        guard let sa = SampleStats(a), let sb = SampleStats(b) else { return (false, "no samples") }
        if let mw = Statistics.mannWhitney(a, b), mw.minimumP < alpha {
            return (mw.p < alpha, String(format: "Mann-Whitney U=%.1f p=%.3f", mw.u, mw.p))
        }
        guard sa.count >= 2, sb.count >= 2 else { return (false, "too few samples to tell change from noise (\(sa.count) vs \(sb.count))") }
        let spread = sa.range / 2 + sb.range / 2
        let delta = abs(sb.median - sa.median)
        let disjoint = sb.min > sa.max || sb.max < sa.min
        return (delta > spread && disjoint, String(format: "median shift %.3g vs combined spread %.3g", delta, spread))
    }

    public static func compare(_ before: BenchReport, _ after: BenchReport) -> [Change] {
        var out: [Change] = []
        for c in after.cells where c.status == .ok {
            guard let old = before.cell(scenario: c.scenario, metric: c.metric, backend: c.backend), old.status == .ok,
                  let so = old.stats, let sn = c.stats else { continue }
            let pct = so.median != 0 ? (sn.median - so.median) / abs(so.median) * 100 : 0
            let d = decide(old.samples, c.samples)
            let improved: Bool? = d.significant ? ((sn.median > so.median) == c.higherIsBetter) : nil
            out.append(Change(scenario: c.scenario, metric: c.metric, backend: c.backend, unit: c.unit, before: so.median,
                              after: sn.median, changePercent: pct, significant: d.significant, improved: improved, method: d.method))
        }
        return out
    }

    public static func markdown(_ changes: [Change]) -> String {
        var md = "| scenario | metric | backend | before | after | change | verdict | test |\n|---|---|---|---|---|---|---|---|\n"
        for c in changes {
            let verdict = !c.significant ? "within noise" : (c.improved == true ? "better" : "worse")
            md += "| \(c.scenario) | \(c.metric) | \(c.backend) | \(MarkdownReport.format(c.before)) \(c.unit) | \(MarkdownReport.format(c.after)) \(c.unit) | \(String(format: "%+.1f%%", c.changePercent)) | \(verdict) | \(c.method) |\n"
        }
        return md
    }
}
