import Foundation
import MicroVMCore

/// Does the host get memory back when an instance is done with it? One instance allocates a
/// burst (half its memory, at most 256 MiB, touched page by page), frees it and idles, while the
/// host samples the memory of the instance's processes (PSS: the VMM, QEMU or the container's
/// processes) every half second. A container's freed pages are the host's at once; a VM's stay
/// with the VMM unless the guest gives them back: with `--balloon` (free page reporting) it does
/// within seconds, without it never. VMs run both ways; the series go into a chart.
public struct MemoryReclaim: BenchScenario {
    public let name = "reclaim"
    public static let returned = Metric("reclaim-returned", "Memory back on the host 10 s after a burst was freed (VMs: balloon with free page reporting)", unit: "%", higherIsBetter: true)
    public static let held = Metric("reclaim-held", "Host memory still held 10 s after the burst (above the idle level before it)", unit: "MiB", higherIsBetter: false)
    public static let returnedWithoutBalloon = Metric("reclaim-returned-no-balloon", "Memory back on the host 10 s after a burst was freed, VM without a balloon", unit: "%", higherIsBetter: true)
    /// Seconds between samples.
    static let interval = 0.5
    public init() {}

    public func metrics(for ctx: BenchContext) -> [Metric] { [Self.returned, Self.held, Self.returnedWithoutBalloon] }
    public func runsPerMeasure(_ ctx: BenchContext) -> Int { 2 }
    public var note: String? { "burst: stress-ng --vm 1 --vm-keep --vm-populate of half the slice's memory (at most 256 MiB) for 4 s, then 12 s idle; host memory = summed PSS of the instance's processes every 0.5 s; returned = (peak − end) / (peak − idle before the burst); details hold the series (seconds:MiB)" }

    /// The instance's command: idle, burst, idle.
    static func command(burst: ByteCount) -> [String] {
        ["sh", "-c", "sleep 3; stress-ng --vm 1 --vm-bytes \(burst.bytes / 1_048_576)M --vm-keep --vm-populate -t 4s --temp-path /tmp --quiet; echo burst-done; sleep 12"]
    }

    public func measure(_ target: BenchTarget, _ ctx: BenchContext) async throws -> [Measurement] {
        guard let backend = target.backend else { throw ScenarioUnavailable(target.record.unavailableReason ?? "unavailable") }
        let burst = ByteCount(min(ctx.slice.memory.bytes / 2, ByteCount.mebibytes(256).bytes))
        let isVM = target.record.mode.isVM
        var out: [Measurement] = []
        let with = try await sample(backend, target, ctx, burst: burst, balloon: isVM ? BalloonSpec() : nil)
        out.append(Measurement(Self.returned, with.returnedPercent, details: with.details))
        out.append(Measurement(Self.held, with.heldMiB, details: with.details))
        if isVM {
            let without = try await sample(backend, target, ctx, burst: burst, balloon: nil)
            out.append(Measurement(Self.returnedWithoutBalloon, without.returnedPercent, details: without.details))
        } else {
            out.append(.unavailable(Self.returnedWithoutBalloon, "a container has no balloon: the pages it frees are the host's at once (see reclaim-returned)"))
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
        var text: String { points.map { String(format: "%.1f:%.1f", $0.t, $0.mib) }.joined(separator: ",") }
    }

    func sample(_ backend: any InstanceBackend, _ target: BenchTarget, _ ctx: BenchContext, burst: ByteCount, balloon: BalloonSpec?) async throws -> Series {
        let name = "bench-reclaim-\(UUID().uuidString.prefix(6).lowercased())"
        let sampler = SeriesSampler(name: name, backend: backend, interval: Self.interval)
        let task = Task { await sampler.run() }
        let result: RunResult
        do {
            result = try await ctx.run(backend, target: target, name: name, command: Self.command(burst: burst), balloon: balloon)
        } catch {
            await sampler.stop()
            _ = await task.value
            throw error
        }
        await sampler.stop()
        var series = Series(points: await task.value, burstMiB: Double(burst.bytes) / 1_048_576)
        let counted = await sampler.processes()
        let output = try requireSuccess(result, "stress-ng burst")
        guard output.contains("burst-done") else { throw MicroVMError(.backend, "the burst did not finish: \(output.suffix(300))") }
        guard series.points.count >= 10, series.peak - series.idleBefore > Double(burst.bytes) / 1_048_576 / 2 else {
            throw ScenarioUnavailable("the instance's host processes (\(counted.joined(separator: ", "))) showed no burst (\(series.points.count) samples, rise \(Int(series.peak - series.idleBefore)) MiB): their memory cannot be measured from the host here")
        }
        series.details = ["series": series.text, "burst-mib": "\(burst.bytes / 1_048_576)", "balloon": balloon == nil ? "none" : "free page reporting",
                          "idle-mib": String(format: "%.1f", series.idleBefore), "peak-mib": String(format: "%.1f", series.peak),
                          "end-mib": String(format: "%.1f", series.end), "processes": counted.joined(separator: ",")]
        return series
    }
}

/// Samples the summed PSS of one instance's processes from the moment one is found.
actor SeriesSampler {
    let name: String
    let backend: any InstanceBackend
    let interval: Double
    var stopped = false
    init(name: String, backend: any InstanceBackend, interval: Double) { self.name = name; self.backend = backend; self.interval = interval }
    func stop() { stopped = true }

    /// The processes counted, by command name.
    var counted = Set<String>()

    func processes() -> [String] { counted.sorted() }

    func run() async -> [(t: Double, mib: Double)] {
        var points: [(t: Double, mib: Double)] = []
        var start: Double?
        while !stopped {
            let pids = ((try? await backend.list()) ?? []).filter { $0.name == name }.compactMap(\.pid)
            let processes = ProcessMemory.instanceProcesses(name: name, pids: pids, table: ProcessMemory.table())
            let total = processes.reduce(UInt64(0)) { $0 + (ProcessMemory.pss(pid: $1.pid) ?? 0) }
            for p in processes { counted.insert(p.comm) }
            if total > 0 {
                let now = Monotonic.seconds()
                if start == nil { start = now }
                points.append((now - (start ?? now), Double(total) / 1_048_576))
            }
            try? await Task.sleep(nanoseconds: UInt64(interval * 1e9))
        }
        return points
    }
}
