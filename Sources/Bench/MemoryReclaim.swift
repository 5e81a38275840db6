import Foundation
import MicroVMCore

/// Does the host get memory back when an instance is done with it, and can another use it? Two
/// instances run side by side: the first allocates a burst (half its memory, at most 256 MiB,
/// touched page by page), frees it and idles; the second bursts as much once the first is idle.
/// The host samples the memory of each one's processes (PSS: the VMM, QEMU or the container's
/// processes) every half second. A container's freed pages are the host's at once; a VM's stay
/// with the VMM unless the guest gives them back: with `--balloon` (free page reporting) it does
/// within seconds, and the pair's peak is one burst; without, never, and the pair holds both.
/// VMs run both ways; the pair's summed series go into a chart.
public struct MemoryReclaim: BenchScenario {
    public var tools: [String] { ["sh", "sleep", "stress-ng"] }
    public let name = "reclaim"
    public static let returned = Metric("reclaim-returned", "Memory back on the host 10 s after a burst was freed (VMs: balloon with free page reporting)", unit: "%", higherIsBetter: true)
    public static let held = Metric("reclaim-held", "Host memory still held 10 s after the burst (above the idle level before it)", unit: "MiB", higherIsBetter: false)
    public static let returnedWithoutBalloon = Metric("reclaim-returned-no-balloon", "Memory back on the host 10 s after a burst was freed, VM without a balloon", unit: "%", higherIsBetter: true)
    public static let pairPeak = Metric("reclaim-pair-peak", "Peak host memory of two instances bursting one after the other, above their idle level (VMs: balloon with free page reporting)", unit: "MiB", higherIsBetter: false)
    public static let pairPeakWithoutBalloon = Metric("reclaim-pair-peak-no-balloon", "Peak host memory of two instances bursting one after the other, above their idle level, VMs without a balloon", unit: "MiB", higherIsBetter: false)
    /// Seconds between samples.
    static let interval = 0.5
    public init() {}

    public func metrics(for ctx: BenchContext) -> [Metric] { [Self.returned, Self.held, Self.returnedWithoutBalloon, Self.pairPeak, Self.pairPeakWithoutBalloon] }
    public func runsPerMeasure(_ ctx: BenchContext) -> Int { 4 }
    public var note: String? { "two instances side by side; the first: stress-ng --vm 1 --vm-keep --vm-populate of half the slice's memory (at most 256 MiB) from 3 s to 7 s, then 12 s idle; the second: the same burst from 12 s to 16 s; host memory = summed PSS of each instance's processes every 0.5 s; returned = (peak − end) / (peak − idle before the burst) of the first; pair peak = the highest sum of both above the sum of their idle levels; details hold the first's series (series-first) and the pair's (series), seconds:MiB" }

    /// An instance's command: idle `before` seconds, burst for 4 s, idle `after` seconds.
    static func command(burst: ByteCount, before: Int = 3, after: Int = 12) -> [String] {
        ["sh", "-c", "sleep \(before); stress-ng --vm 1 --vm-bytes \(burst.bytes / 1_048_576)M --vm-keep --vm-populate -t 4s --temp-path /tmp --quiet; echo burst-done; sleep \(after)"]
    }

    public func measure(_ target: BenchTarget, _ ctx: BenchContext) async throws -> [Measurement] {
        guard let backend = target.backend else { throw ScenarioUnavailable(target.record.unavailableReason ?? "unavailable") }
        let burst = ByteCount(min(ctx.slice.memory.bytes / 2, ByteCount.mebibytes(256).bytes))
        let isVM = target.record.mode.isVM
        var out: [Measurement] = []
        let with = try await samplePair(backend, target, ctx, burst: burst, balloon: isVM ? BalloonSpec() : nil)
        out.append(Measurement(Self.returned, with.first.returnedPercent, details: with.details))
        out.append(Measurement(Self.held, with.first.heldMiB, details: with.details))
        out.append(Measurement(Self.pairPeak, with.pairRiseMiB, details: with.details))
        if isVM {
            let without = try await samplePair(backend, target, ctx, burst: burst, balloon: nil)
            out.append(Measurement(Self.returnedWithoutBalloon, without.first.returnedPercent, details: without.details))
            out.append(Measurement(Self.pairPeakWithoutBalloon, without.pairRiseMiB, details: without.details))
        } else {
            let why = "a container has no balloon: the pages it frees are the host's at once (see reclaim-returned and reclaim-pair-peak)"
            out.append(.unavailable(Self.returnedWithoutBalloon, why))
            out.append(.unavailable(Self.pairPeakWithoutBalloon, why))
        }
        return out
    }

    struct Series {
        var points: [(t: Double, mib: Double)]
        var details: [String: String] = [:]

        /// The burst's size in MiB: where it arrives is the first sample within half of it of the peak.
        var burstMiB: Double = 0

        /// The highest sample; the idle level is where the burst's rise began: from the burst's
        /// arrival, back while each earlier sample is lower by more than 1 % of the burst (a VM's
        /// memory also grows while it boots, before a plateau); the end is the mean of the last three.
        var peak: Double { points.map(\.mib).max() ?? 0 }
        var idleBefore: Double {
            let p = peak
            guard var i = points.firstIndex(where: { $0.mib >= p - burstMiB / 2 }) else { return 0 }
            while i > 0, points[i - 1].mib < points[i].mib - burstMiB / 100 { i -= 1 }
            return points[i].mib
        }
        var end: Double { let tail = points.suffix(3).map(\.mib); return tail.isEmpty ? 0 : tail.reduce(0, +) / Double(tail.count) }
        var returnedPercent: Double { let rise = peak - idleBefore; return rise > 1 ? 100 * (peak - end) / rise : .nan }
        var heldMiB: Double { max(0, end - idleBefore) }
        var text: String { Self.text(points) }
        /// `seconds:MiB,…`, the form the details and the chart read.
        static func text(_ points: [(t: Double, mib: Double)]) -> String {
            points.map { String(format: "%.1f:%.1f", $0.t, $0.mib) }.joined(separator: ",")
        }
    }

    /// What one pair's run measured: the first instance's series, the pair's summed series, and
    /// how far the sum rose above both idle levels.
    struct PairSeries {
        var first: Series
        var second: Series
        var sum: [(t: Double, mib: Double)]
        var details: [String: String] = [:]
        var pairRiseMiB: Double { max(0, (sum.map(\.mib).max() ?? 0) - first.idleBefore - second.idleBefore) }
    }

    /// The two instances' series: the first bursts at 3 s, the second at 12 s, once the first
    /// has freed its burst and (with a balloon) reported it.
    func samplePair(_ backend: any InstanceBackend, _ target: BenchTarget, _ ctx: BenchContext, burst: ByteCount, balloon: BalloonSpec?) async throws -> PairSeries {
        let id = UUID().uuidString.prefix(6).lowercased()
        let names = ["bench-reclaim-a-\(id)", "bench-reclaim-b-\(id)"]
        let sampler = SeriesSampler(names: names, backend: backend, interval: Self.interval)
        let task = Task { await sampler.run() }
        let results: [Result<RunResult, any Error>]
        async let a = Result { try await ctx.run(backend, target: target, name: names[0], command: Self.command(burst: burst), balloon: balloon) }
        async let b = Result { try await ctx.run(backend, target: target, name: names[1], command: Self.command(burst: burst, before: 12, after: 3), balloon: balloon) }
        results = [await a, await b]
        await sampler.stop()
        let ticks = await task.value
        let counted = await sampler.processes()
        var series: [Series] = []
        for (i, result) in results.enumerated() {
            let output = try requireSuccess(try result.get(), "stress-ng burst")
            guard output.contains("burst-done") else { throw MicroVMError(.backend, "the burst did not finish: \(output.suffix(300))") }
            let s = Series(points: ticks.compactMap { tick in tick.mib[names[i]].map { (tick.t, $0) } }, burstMiB: Double(burst.bytes) / 1_048_576)
            guard s.points.count >= 10, s.peak - s.idleBefore > s.burstMiB / 2 else {
                throw ScenarioUnavailable("the instance's host processes (\(counted.joined(separator: ", "))) showed no burst (\(s.points.count) samples, rise \(Int(s.peak - s.idleBefore)) MiB): their memory cannot be measured from the host here")
            }
            series.append(s)
        }
        // The pair's host memory where both were seen.
        let sum = ticks.compactMap { tick -> (t: Double, mib: Double)? in
            guard let x = tick.mib[names[0]], let y = tick.mib[names[1]] else { return nil }
            return (tick.t, x + y)
        }
        var pair = PairSeries(first: series[0], second: series[1], sum: sum)
        pair.details = ["series": Series.text(sum), "series-first": pair.first.text, "burst-mib": "\(burst.bytes / 1_048_576)",
                        "balloon": balloon == nil ? "none" : "free page reporting",
                        "idle-mib": String(format: "%.1f", pair.first.idleBefore), "peak-mib": String(format: "%.1f", pair.first.peak),
                        "end-mib": String(format: "%.1f", pair.first.end), "pair-idle-mib": String(format: "%.1f", pair.first.idleBefore + pair.second.idleBefore),
                        "pair-peak-mib": String(format: "%.1f", sum.map(\.mib).max() ?? 0), "processes": counted.joined(separator: ",")]
        return pair
    }
}

/// Samples the summed PSS of each named instance's processes, at the same moments, from the
/// moment one of them is found.
actor SeriesSampler {
    struct Tick: Sendable { var t: Double; var mib: [String: Double] }
    let names: [String]
    let backend: any InstanceBackend
    let interval: Double
    var stopped = false
    init(names: [String], backend: any InstanceBackend, interval: Double) { self.names = names; self.backend = backend; self.interval = interval }
    func stop() { stopped = true }

    /// The processes counted, by command name.
    var counted = Set<String>()

    func processes() -> [String] { counted.sorted() }

    func run() async -> [Tick] {
        var ticks: [Tick] = []
        var start: Double?
        while !stopped {
            let listed = (try? await backend.list()) ?? []
            let table = ProcessMemory.table()
            var tick = Tick(t: 0, mib: [:])
            for name in names {
                let pids = listed.filter { $0.name == name }.compactMap(\.pid)
                let processes = ProcessMemory.instanceProcesses(name: name, pids: pids, table: table)
                let total = ProcessMemory.pss(of: processes)
                for p in processes { counted.insert(p.comm) }
                if total > 0 { tick.mib[name] = Double(total) / 1_048_576 }
            }
            if !tick.mib.isEmpty {
                let now = Monotonic.seconds()
                if start == nil { start = now }
                tick.t = now - (start ?? now)
                ticks.append(tick)
            }
            try? await Task.sleep(nanoseconds: UInt64(interval * 1e9))
        }
        return ticks
    }
}
