import Foundation
import Testing
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
        let tied = try #require(Statistics.mannWhitney([1, 1, 2, 2, 3, 3], [5, 5, 6, 6, 7, 7]))
        #expect(!tied.exact)
        #expect(tied.p < 0.01)
        // Two samples each can never reach p < 0.05: the compare falls back to the spread rule.
        let small = try #require(Statistics.mannWhitney([1, 2], [8, 9]))
        #expect(small.minimumP > 0.05)
    }

    @Test func compareNoiseDecision() {
        #expect(BenchComparison.decide([100, 101, 99, 100, 102], [120, 121, 119, 122, 120]).significant)
        #expect(!BenchComparison.decide([100, 110, 90, 105, 95], [101, 111, 91, 104, 96]).significant)
        // Few samples: the spread rule decides.
        #expect(BenchComparison.decide([100, 102], [150, 151]).significant)
        #expect(!BenchComparison.decide([100, 140], [120, 150]).significant)
        // One sample each decides nothing.
        let one = BenchComparison.decide([100], [200])
        #expect(!one.significant)
        #expect(one.method.contains("too few"))
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
