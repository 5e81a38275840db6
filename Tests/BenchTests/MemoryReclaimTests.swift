import Testing
@testable import Bench

/// The reclaim scenario's arithmetic on host-memory series: the idle level is taken before the
/// burst arrives (a VM's memory also grows while it boots), the end from the last samples.
@Suite struct MemoryReclaimTests {
    /// Boot to 200, idle, a 256 MiB burst to 456, then back to `end`.
    static func series(end: Double) -> MemoryReclaim.Series {
        let values: [Double] = [50, 120, 190, 200, 200, 200, 330, 456, 456, 456, end, end, end]
        return MemoryReclaim.Series(points: values.enumerated().map { (Double($0.offset) * 0.5, $0.element) }, burstMiB: 256)
    }

    @Test func aGuestThatGivesTheBurstBackReturnsAllOfIt() {
        let s = Self.series(end: 210)
        #expect(s.peak == 456 && s.idleBefore == 200 && s.end == 210)
        #expect(abs(s.returnedPercent - 100 * 246 / 256) < 0.01)
        #expect(s.heldMiB == 10)
    }

    @Test func aGuestThatKeepsItReturnsNothing() {
        let s = Self.series(end: 456)
        #expect(s.idleBefore == 200, "the idle level comes from before the burst, not from the plateau after it")
        #expect(s.returnedPercent == 0 && s.heldMiB == 256)
        #expect(MemoryReclaim.Series(points: [(0, 10), (0.5, 10)], burstMiB: 256).returnedPercent.isNaN, "no rise: no percentage")
    }

    /// Two instances bursting one after the other: when the first gives its burst back the pair
    /// peaks at one burst above their idle levels; when it keeps it, at both.
    @Test func aPairPeaksAtOneBurstOnlyWhenTheFirstGivesItBack() {
        let idle: [Double] = [50, 120, 190, 200, 200, 200]
        func pair(firstEnd: Double) -> MemoryReclaim.PairSeries {
            let a = idle + [330, 456, 456, firstEnd, firstEnd, firstEnd, firstEnd, firstEnd, firstEnd]
            let b = idle + [200, 200, 200, 200, 200, 330, 456, 456, 200]
            func series(_ v: [Double]) -> MemoryReclaim.Series {
                MemoryReclaim.Series(points: v.enumerated().map { (Double($0.offset) * 0.5, $0.element) }, burstMiB: 256)
            }
            let sum = zip(a, b).enumerated().map { (t: Double($0.offset) * 0.5, mib: $0.element.0 + $0.element.1) }
            return MemoryReclaim.PairSeries(first: series(a), second: series(b), sum: sum)
        }
        #expect(pair(firstEnd: 205).pairRiseMiB == 261)
        #expect(pair(firstEnd: 456).pairRiseMiB == 512)
    }
}
