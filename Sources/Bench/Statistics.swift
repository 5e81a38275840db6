import Foundation

/// Summary statistics of one cell's raw samples. Percentiles interpolate linearly between order
/// statistics (Hyndman–Fan type 7, what NumPy and R use by default), so p99 of a few samples is
/// close to the maximum rather than jumping to it.
public struct SampleStats: Codable, Sendable, Equatable {
    public var count: Int
    public var median: Double
    public var p99: Double
    public var min: Double
    public var max: Double
    public var q1: Double
    public var q3: Double
    public var mean: Double

    /// nil for an empty sample set: a cell without samples has no statistics, not zeros.
    public init?(_ samples: [Double]) {
        let s = samples.filter { $0.isFinite }.sorted()
        guard let first = s.first, let last = s.last else { return nil }
        count = s.count
        min = first
        max = last
        median = Statistics.percentile(sorted: s, 50)
        p99 = Statistics.percentile(sorted: s, 99)
        q1 = Statistics.percentile(sorted: s, 25)
        q3 = Statistics.percentile(sorted: s, 75)
        mean = s.reduce(0, +) / Double(s.count)
    }

    public var iqr: Double { q3 - q1 }
    public var range: Double { max - min }
}

public enum Statistics {
    /// Percentile `p` (0...100) of already sorted samples.
    public static func percentile(sorted s: [Double], _ p: Double) -> Double {
        precondition(!s.isEmpty, "percentile of no samples")
        if s.count == 1 { return s[0] }
        let h = (Double(s.count - 1) * Swift.min(Swift.max(p, 0), 100) / 100)
        let lo = Int(h.rounded(.down))
        let hi = Swift.min(lo + 1, s.count - 1)
        return s[lo] + (h - Double(lo)) * (s[hi] - s[lo])
    }

    public static func percentile(_ samples: [Double], _ p: Double) -> Double {
        percentile(sorted: samples.sorted(), p)
    }

    public static func median(_ samples: [Double]) -> Double { percentile(samples, 50) }

    /// A backend's result relative to native in the same run, from the raw samples of both:
    /// the ratio of medians, and the widest ratio the samples allow (min/max and max/min) as its spread.
    public struct Ratio: Codable, Sendable, Equatable {
        public var median: Double
        public var low: Double
        public var high: Double
    }

    public static func ratio(_ samples: [Double], to baseline: [Double]) -> Ratio? {
        guard let a = SampleStats(samples), let b = SampleStats(baseline), b.median != 0, b.min != 0, b.max != 0 else { return nil }
        let candidates = [a.min / b.max, a.max / b.min]
        return Ratio(median: a.median / b.median, low: candidates.min() ?? 0, high: candidates.max() ?? 0)
    }

    /// Two-sided Mann–Whitney U test (the Wilcoxon rank-sum test). For up to `exactLimit` samples
    /// in all the p-value is exact: the share of all ways to split the pooled (mid)ranks into groups
    /// of these sizes whose rank sum lies at least as far from its mean as the observed one, ties
    /// included. Beyond that, the normal approximation with tie correction.
    public struct MannWhitney: Codable, Sendable, Equatable {
        public var u: Double
        public var p: Double
        public var exact: Bool
        /// The smallest p this test could give for groups of these sizes (and ties): when it is
        /// above the significance level, no data could be called a change.
        public var minimumP: Double
    }

    public static let exactLimit = 60

    public static func mannWhitney(_ x: [Double], _ y: [Double]) -> MannWhitney? {
        let n1 = x.count, n2 = y.count
        guard n1 > 0, n2 > 0 else { return nil }
        let all = (x.map { ($0, 0) } + y.map { ($0, 1) }).sorted { $0.0 < $1.0 }
        // Ranks doubled, so that midranks of ties stay integers.
        var ranks2 = [Int](repeating: 0, count: all.count)
        var tieTerm = 0.0
        var i = 0
        while i < all.count {
            var j = i
            while j + 1 < all.count && all[j + 1].0 == all[i].0 { j += 1 }
            for k in i...j { ranks2[k] = i + j + 2 }
            let t = Double(j - i + 1)
            tieTerm += t * t * t - t
            i = j + 1
        }
        var r1x2 = 0
        for (k, e) in all.enumerated() where e.1 == 0 { r1x2 += ranks2[k] }
        let u1 = Double(r1x2) / 2 - Double(n1 * (n1 + 1)) / 2
        let u = Swift.min(u1, Double(n1 * n2) - u1)
        let n = n1 + n2
        if n <= exactLimit {
            let counts = rankSumCounts(doubledRanks: ranks2, k: n1)
            let total = counts.reduce(0, +)
            // The mean of the doubled rank sum is n1 (n + 1); compare distances in the same units.
            let mean = n1 * (n + 1)
            let observed = abs(r1x2 - mean)
            var tail = 0.0, extreme = 0.0, widest = 0
            for (s, c) in counts.enumerated() where c > 0 {
                let d = abs(s - mean)
                if d >= observed { tail += c }
                if d > widest { widest = d; extreme = c } else if d == widest { extreme += c }
            }
            return MannWhitney(u: u, p: Swift.min(1, tail / total), exact: true, minimumP: Swift.min(1, extreme / total))
        }
        let nn = Double(n)
        let mu = Double(n1 * n2) / 2
        let sigma2 = Double(n1 * n2) / 12 * ((nn + 1) - tieTerm / (nn * (nn - 1)))
        let minimumP = Swift.min(1, 2 / binomial(n, n1))
        guard sigma2 > 0 else { return MannWhitney(u: u, p: 1, exact: false, minimumP: minimumP) }
        let z = (abs(u - mu) - 0.5) / sigma2.squareRoot()
        let p = Swift.min(1, Swift.max(0, erfc(Swift.max(z, 0) / 2.0.squareRoot())))
        return MannWhitney(u: u, p: p, exact: false, minimumP: minimumP)
    }

    static func binomial(_ n: Int, _ k: Int) -> Double {
        var r = 1.0
        for i in 0..<k { r = r * Double(n - i) / Double(i + 1) }
        return r
    }

    /// counts[s]: how many k-element subsets of these (doubled) ranks sum to s.
    static func rankSumCounts(doubledRanks: [Int], k: Int) -> [Double] {
        let maxSum = doubledRanks.sorted(by: >).prefix(k).reduce(0, +)
        // ways[j][s]: subsets of j of the ranks seen so far that sum to s.
        var ways = [[Double]](repeating: [Double](repeating: 0, count: maxSum + 1), count: k + 1)
        ways[0][0] = 1
        for r in doubledRanks {
            for j in stride(from: k, through: 1, by: -1) {
                let from = ways[j - 1]
                for s in stride(from: maxSum, through: r, by: -1) where from[s - r] > 0 { ways[j][s] += from[s - r] }
            }
        }
        return ways[k]
    }
}
