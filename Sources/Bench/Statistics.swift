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

    /// Two-sided Mann–Whitney U test. Exact p-value (by counting rank sums) when there are no ties
    /// and the groups are small; otherwise the normal approximation with tie correction.
    public struct MannWhitney: Codable, Sendable, Equatable {
        public var u: Double
        public var p: Double
        public var exact: Bool
        /// The smallest p this test could give for groups of these sizes: when it is above the
        /// significance level, the test cannot decide and another rule must.
        public var minimumP: Double
    }

    public static func mannWhitney(_ x: [Double], _ y: [Double]) -> MannWhitney? {
        let n1 = x.count, n2 = y.count
        guard n1 > 0, n2 > 0 else { return nil }
        let all = (x.map { ($0, 0) } + y.map { ($0, 1) }).sorted { $0.0 < $1.0 }
        var ranks = [Double](repeating: 0, count: all.count)
        var tieTerm = 0.0
        var i = 0
        while i < all.count {
            var j = i
            while j + 1 < all.count && all[j + 1].0 == all[i].0 { j += 1 }
            let r = Double(i + j) / 2 + 1
            for k in i...j { ranks[k] = r }
            let t = Double(j - i + 1)
            tieTerm += t * t * t - t
            i = j + 1
        }
        var r1 = 0.0
        for (k, e) in all.enumerated() where e.1 == 0 { r1 += ranks[k] }
        let u1 = r1 - Double(n1 * (n1 + 1)) / 2
        let u2 = Double(n1 * n2) - u1
        let u = Swift.min(u1, u2)
        let total = binomial(n1 + n2, n1)
        let minimumP = Swift.min(1, 2 / total)
        if tieTerm == 0, n1 + n2 <= 30 {
            // Count subsets of n1 ranks (1...N) by their sum; U = sum - n1(n1+1)/2.
            let counts = rankSumCounts(n: n1 + n2, k: n1)
            let uMax = n1 * n2
            var tail = 0.0
            for uu in 0...uMax where Double(uu) <= u { tail += counts[uu] }
            return MannWhitney(u: u, p: Swift.min(1, 2 * tail / total), exact: true, minimumP: minimumP)
        }
        let n = Double(n1 + n2)
        let mu = Double(n1 * n2) / 2
        let sigma2 = Double(n1 * n2) / 12 * ((n + 1) - tieTerm / (n * (n - 1)))
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

    /// counts[u]: how many k-subsets of 1...n have U statistic u.
    static func rankSumCounts(n: Int, k: Int) -> [Double] {
        let m = n - k
        // f[i][j][u]: ways with i items of group 1 and j of group 2, U = u (a classic recurrence).
        var table = [[[Double]]](repeating: [[Double]](repeating: [], count: m + 1), count: k + 1)
        for i in 0...k {
            for j in 0...m {
                var row = [Double](repeating: 0, count: i * j + 1)
                if i == 0 || j == 0 { row[0] = 1 } else {
                    // The largest value belongs to group 1 (adds j to U) or to group 2 (adds nothing).
                    let a = table[i - 1][j], b = table[i][j - 1]
                    for u in 0..<row.count {
                        if u - j >= 0 && u - j < a.count { row[u] += a[u - j] }
                        if u < b.count { row[u] += b[u] }
                    }
                }
                table[i][j] = row
            }
        }
        return table[k][m]
    }
}
