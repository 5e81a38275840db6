import Foundation
import Testing
import MicroVMCore
@testable import Bench

@Suite struct StatisticsTests {
    @Test func medianAndPercentilesOnKnownSamples() throws {
        let s = try #require(SampleStats([4, 1, 3, 2]))
        #expect(s.count == 4)
        #expect(s.median == 2.5)
        #expect(s.min == 1 && s.max == 4)
        #expect(abs(s.p99 - 3.97) < 1e-9)
        #expect(s.q1 == 1.75 && s.q3 == 3.25)
        #expect(s.mean == 2.5)
        let hundred = try #require(SampleStats((1...100).map(Double.init)))
        #expect(abs(hundred.p99 - 99.01) < 1e-9)
        #expect(hundred.median == 50.5)
    }

    @Test func emptyAndSingleSample() {
        #expect(SampleStats([]) == nil)
        #expect(SampleStats([.nan]) == nil)
        let one = SampleStats([7])
        #expect(one?.median == 7 && one?.p99 == 7 && one?.range == 0)
    }

    @Test func ratioComesFromRawSamples() throws {
        let r = try #require(Statistics.ratio([200, 210, 190], to: [100, 100, 110]))
        #expect(r.median == 2.0)
        #expect(abs(r.low - 190.0 / 110.0) < 1e-12)
        #expect(r.high == 2.1)
        #expect(Statistics.ratio([1], to: [0]) == nil)
        #expect(Statistics.ratio([], to: [1]) == nil)
    }

    @Test func mannWhitneyExactAndApproximate() throws {
        let sep = try #require(Statistics.mannWhitney([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]))
        #expect(sep.exact)
        #expect(sep.u == 0)
        #expect(abs(sep.p - 2.0 / 252.0) < 1e-12)
        let same = try #require(Statistics.mannWhitney([1, 3, 5, 7], [2, 4, 6, 8]))
        #expect(same.p > 0.5)
        // Ties no longer force the approximation: separated groups of six, p = 2 / C(12, 6).
        let tied = try #require(Statistics.mannWhitney([1, 1, 2, 2, 3, 3], [5, 5, 6, 6, 7, 7]))
        #expect(tied.exact)
        #expect(abs(tied.p - 2.0 / 924.0) < 1e-12)
        // Two samples each can never reach p < 0.01 (the old rule then called disjoint ranges a change).
        let small = try #require(Statistics.mannWhitney([1, 2], [8, 9]))
        #expect(small.minimumP > 0.01)
        #expect(abs(small.p - 2.0 / 6.0) < 1e-12)
        // Five a side is the smallest balanced design that can go below 0.01.
        #expect(try #require(Statistics.mannWhitney([1, 2, 3, 4], [5, 6, 7, 8])).minimumP > 0.01)
        #expect(try #require(Statistics.mannWhitney([1, 2, 3, 4, 5], [6, 7, 8, 9, 10])).minimumP < 0.01)
    }

    /// The exact p with ties equals the share of all relabellings at least as extreme, counted one by one.
    @Test func exactPValueWithTiesMatchesEnumeration() throws {
        var g = SeededGenerator(seed: 7)
        for _ in 0..<30 {
            let n1 = 2 + g.below(5), n2 = 2 + g.below(5)
            // Few distinct values, so ties are common.
            let x = (0..<n1).map { _ in Double(g.below(4)) }, y = (0..<n2).map { _ in Double(g.below(4)) }
            let mw = try #require(Statistics.mannWhitney(x, y))
            #expect(abs(mw.p - bruteForceP(x, y)) < 1e-9, "\(x) vs \(y): \(mw.p)")
        }
    }

    /// Two-sided permutation p of the (mid)rank sum, by enumerating every split of the pooled values.
    func bruteForceP(_ x: [Double], _ y: [Double]) -> Double {
        let pooled = x + y, n = pooled.count
        let sorted = pooled.sorted()
        func midrank(_ v: Double) -> Double {
            let lo = sorted.firstIndex(of: v)!, hi = sorted.lastIndex(of: v)!
            return Double(lo + hi) / 2 + 1
        }
        let ranks = pooled.map(midrank)
        let mean = Double(x.count) * Double(n + 1) / 2
        let observed = abs(ranks.prefix(x.count).reduce(0, +) - mean)
        var extreme = 0, total = 0
        for mask in 0..<(1 << n) where mask.nonzeroBitCount == x.count {
            let sum = (0..<n).filter { mask & (1 << $0) != 0 }.map { ranks[$0] }.reduce(0, +)
            total += 1
            if abs(sum - mean) >= observed - 1e-9 { extreme += 1 }
        }
        return Double(extreme) / Double(total)
    }

    @Test func compareDecision() {
        let up = BenchComparison.decide([100, 101, 99, 100, 102], [120, 121, 119, 122, 120], floor: 5, higherIsBetter: true)
        #expect(up.verdict == .better)
        #expect(BenchComparison.decide([100, 101, 99, 100, 102], [120, 121, 119, 122, 120], floor: 5, higherIsBetter: false).verdict == .worse)
        #expect(BenchComparison.decide([100, 110, 90, 105, 95], [101, 111, 91, 104, 96], floor: 5, higherIsBetter: true).verdict == .withinNoise)
        // Separated, so p < 0.01, but by 2 %: under the floor.
        let small = BenchComparison.decide([100, 100.1, 100.2, 100.3, 100.4], [102, 102.1, 102.2, 102.3, 102.4], floor: 5, higherIsBetter: true)
        #expect(small.verdict == .withinNoise)
        #expect((small.p ?? 1) < 0.01)
        // Fewer than five a side: no verdict, however far apart (the old rule called this a change).
        let few = BenchComparison.decide([100, 102], [150, 151], floor: 5, higherIsBetter: true)
        #expect(few.verdict == .tooFewSamples)
        #expect(BenchComparison.decide([100, 101, 102, 103], [200, 201, 202, 203], floor: 5, higherIsBetter: true).verdict == .tooFewSamples)
    }

    @Test func successRule() {
        let cases: [(Int, Int, Bool)] = [(1, 1, true), (0, 1, false), (2, 2, true), (1, 2, false), (2, 3, true), (1, 3, false),
                                         (3, 4, true), (2, 4, false), (3, 5, true), (2, 5, false), (0, 0, false)]
        for (s, a, enough) in cases { #expect(Cell.hasEnoughSuccesses(s, of: a) == enough, "\(s) of \(a)") }
        #expect(Cell.status(successes: 2, attempts: 5) == .partial)
        #expect(Cell.status(successes: 0, attempts: 5) == .failed)
        // A made-up ok cell that the rule does not grant gets no summary.
        let c = Cell(scenario: "s", metric: "m", title: "t", unit: "u", higherIsBetter: true, backend: "b", status: .ok,
                     samples: [1, 2], attempts: 5, successes: 2, failures: ["repeat 3: x", "repeat 4: x", "repeat 5: x"])
        #expect(c.status == .partial && c.stats == nil)
    }

    @Test func toolParsers() {
        #expect(ToolParsers.sysbenchEventsPerSecond("CPU speed:\n    events per second:  2816.77\n") == 2816.77)
        #expect(ToolParsers.sysbenchMiBPerSecond("4524.78 MiB transferred (4519.20 MiB/sec)\n") == 4519.20)
        #expect(ToolParsers.ddSeconds("200000+0 records out\n200000 bytes (200 kB, 195 KiB) copied, 0.150315 s, 1.3 MB/s\n") == 0.150315)
        #expect(ToolParsers.ddSeconds("200000+0 records out\n") == nil)
        #expect(ToolParsers.sysbenchEventsPerSecond("garbage") == nil)
        let fio = #"note: something {"jobs": [{"read": {"iops": 1234.5}, "write": {"iops": 0}}]}"#
        #expect(ToolParsers.fioIOPS(fio, write: false) == 1234.5)
        #expect(ToolParsers.fioIOPS(fio, write: true) == nil)
        #expect(ToolParsers.fioIOPS("{ not json", write: false) == nil)
        #expect(ToolParsers.iperfBitsPerSecond(#"{"end": {"sum_received": {"bits_per_second": 9.5e9}}}"#) == 9.5e9)
        let seq = #"{"jobs": [{"read": {"iops": 80, "bw_bytes": 10485760}, "write": {"bw_bytes": 0}}]}"#
        #expect(ToolParsers.fioBandwidth(seq, write: false) == 10_485_760)
        #expect(ToolParsers.fioBandwidth(seq, write: true) == nil)
        let busybox = "PING 10.0.0.1 (10.0.0.1): 56 data bytes\n--- 10.0.0.1 ping statistics ---\n10 packets transmitted, 10 packets received, 0% packet loss\nround-trip min/avg/max = 0.112/0.345/1.020 ms\n"
        #expect(ToolParsers.pingAverageMilliseconds(busybox) == 0.345)
        #expect(ToolParsers.pingAverageMilliseconds("rtt min/avg/max/mdev = 0.031/0.047/0.070/0.012 ms\n") == 0.047)
        #expect(ToolParsers.pingAverageMilliseconds("ping: permission denied (are you root?)\n") == nil)
        #expect(ToolParsers.pingAverageMilliseconds("round-trip min/avg/max = x/y/z ms\n") == nil)
        #expect(ToolParsers.keyValues("x\nbomb_status=137 other=1\n")["bomb_status"] == "137")
        #expect(ProcessMemory.parsePss("Rss: 10 kB\nPss:                 2048 kB\n") == 2048 * 1024)
    }
}
