import Foundation
import MicroVMCore
#if canImport(Glibc)
import Glibc
#endif

/// A victim instance runs sysbench cpu alone, then beside an aggressor instance (same slice, same
/// backend) that runs each attack in turn. Reports the victim's slowdown and who survived.
public struct NoisyNeighbour: BenchScenario {
    public var tools: [String] { ["sysbench", "stress-ng"] }
    public let name = "noisy-neighbour"

    public enum Aggressor: String, CaseIterable, Sendable {
        case cpuHog = "cpu-hog", memoryBomb = "memory-bomb", forkBomb = "fork-bomb", diskHog = "disk-hog", networkFlood = "network-flood"
    }

    public var aggressors: [Aggressor]
    public init(aggressors: [Aggressor] = Aggressor.allCases) { self.aggressors = aggressors }

    public static func metric(_ a: Aggressor) -> Metric {
        Metric("victim-slowdown-\(a.rawValue)", "Noisy neighbour: victim slowdown under \(a.rawValue)", unit: "%", higherIsBetter: false)
    }
    public func metrics(for ctx: BenchContext) -> [Metric] { aggressors.map(Self.metric) }
    public func runsPerMeasure(_ ctx: BenchContext) -> Int { 1 + 2 * aggressors.count }
    public var note: String? { "victim: sysbench cpu (1 thread); slowdown = (alone − beside aggressor) / alone × 100; details say whether victim, aggressor and host survived and how the aggressor was contained; a repeat whose victim died or whose aggressor did not run is a failure, not a slowdown" }

    /// The attack's command, sized from the slice so that a limit, when there is one, is what stops it.
    static func command(_ a: Aggressor, slice: ResourceSlice, seconds: Int, hostAddress: String?, port: Int) -> [String] {
        switch a {
        case .cpuHog:
            // stress-ng refuses to start without a writable temp path; a container's / is read-only.
            return ["stress-ng", "--cpu", "0", "--timeout", "\(seconds)s", "--temp-path", "/tmp", "--quiet"]
        case .memoryBomb:
            // tail buffers a line without end: it grows until the bytes run out or a limit kills it.
            let bytes = slice.memory.bytes * 2
            return ["sh", "-c", "head -c \(bytes) /dev/zero | tail > /dev/null; echo bomb_status=$?; sleep \(seconds / 2)"]
        case .forkBomb:
            let n = (slice.pidsLimit ?? 1024) + 256
            return ["sh", "-c", "i=0; while [ $i -lt \(n) ]; do sleep \(seconds) & i=$((i+1)); done; echo spawned=$i target=\(n); wait"]
        case .diskHog:
            return ["sh", "-c", "fio --name=hog --filename=/tmp/mvm-bench-hog --size=256M --bs=1M --rw=write --ioengine=psync --direct=1 --time_based --runtime=\(seconds) --output-format=terse > /dev/null 2>&1 || fio --name=hog --filename=/tmp/mvm-bench-hog --size=256M --bs=1M --rw=write --ioengine=psync --direct=0 --end_fsync=1 --time_based --runtime=\(seconds) --output-format=terse > /dev/null 2>&1; rm -f /tmp/mvm-bench-hog; echo hog_done=1"]
        case .networkFlood:
            return ["iperf3", "-c", hostAddress ?? "127.0.0.1", "-p", "\(port)", "-u", "-b", "0", "-t", "\(seconds)", "-J"]
        }
    }

    /// How the aggressor ended, in words, from its run (or the error that ended it).
    public static func classify(_ a: Aggressor, result: RunResult?, error: String?, slice: ResourceSlice) -> (contained: Bool?, text: String) {
        // Without a result nothing shows the attack ran, so nothing shows it was contained.
        guard let r = result else { return (nil, "did not run: \(error ?? "unknown error")") }
        let kv = ToolParsers.keyValues(r.output)
        switch a {
        case .memoryBomb:
            if let s = kv["bomb_status"].flatMap(Int32.init) {
                if s == 0 { return (false, "not contained: allocated \(slice.memory.bytes * 2 / 1_048_576) MiB unhindered") }
                if s == 137 { return (true, "contained: the bomb was OOM-killed inside its instance (status 137)") }
                return (true, "contained: the bomb ended with status \(s)")
            }
            return (true, "contained: the instance ended (status \(r.exitStatus)) before the bomb reported")
        case .forkBomb:
            if let spawned = kv["spawned"].flatMap(Int.init), let target = kv["target"].flatMap(Int.init), spawned >= target {
                return (false, "not contained: \(spawned) processes spawned")
            }
            return (true, "contained: forks refused before the target (status \(r.exitStatus))")
        case .cpuHog:
            return (nil, r.exitStatus == 0 ? "ran to its end (CPU is shared by weight/placement, not refused)" : "ended with status \(r.exitStatus)")
        case .diskHog:
            return (nil, kv["hog_done"] == "1" ? "ran to its end (disk bandwidth is shared)" : "ended with status \(r.exitStatus)")
        case .networkFlood:
            return (nil, r.exitStatus == 0 ? "ran to its end" : "ended with status \(r.exitStatus)")
        }
    }

    func victim(_ target: BenchTarget, _ ctx: BenchContext) async -> (eps: Double?, status: String) {
        do {
            let r = try await ctx.run(target, ["sysbench", "cpu", "--threads=1", "--time=\(Int(ctx.durations.victimSeconds))", "run"], tag: "victim")
            guard r.exitStatus == 0, let v = ToolParsers.sysbenchEventsPerSecond(r.output) else {
                return (nil, "victim did not finish its work (status \(r.exitStatus))")
            }
            return (v, "survived")
        } catch {
            return (nil, "victim failed: \(error)")
        }
    }

    public func measure(_ target: BenchTarget, _ ctx: BenchContext) async throws -> [Measurement] {
        let alone = await victim(target, ctx)
        guard let base = alone.eps, base > 0 else { throw MicroVMError(.backend, "the victim alone did not run: \(alone.status)") }
        var out: [Measurement] = []
        for a in aggressors {
            let metric = Self.metric(a)
            var server: IperfServer?
            var link: (net: NetSpec?, hostAddress: String)?
            if a == .networkFlood {
                do { link = try target.link() } catch { out.append(.unavailable(metric, "\(error)")); continue }
                server = try? IperfServer.start()
                if server == nil { out.append(.unavailable(metric, "no iperf3 server could be started on the host")); continue }
            }
            // The aggressor starts first and outlasts the victim's run (both boot side by side).
            let seconds = Int(ctx.durations.victimSeconds) + 4
            let cmd = Self.command(a, slice: ctx.slice, seconds: seconds, hostAddress: link?.hostAddress, port: server?.port ?? 0)
            let aggressorNet = link?.net
            async let aggressorRun: (RunResult?, String?) = {
                do { return (try await ctx.run(target, cmd, tag: "aggr", net: aggressorNet), nil) } catch { return (nil, String(describing: error)) }
            }()
            try? await Task.sleep(nanoseconds: 1_000_000_000)
            let v = await victim(target, ctx)
            let (ar, aerr) = await aggressorRun
            server?.stop()
            let verdict = Self.classify(a, result: ar, error: aerr, slice: ctx.slice)
            let host = Self.hostCheck()
            var details = ["victim": v.status, "aggressor": verdict.text, "host": host,
                           "victimAlone": String(format: "%.1f", base)]
            if let c = verdict.contained { details["aggressorContained"] = c ? "true" : "false" }
            out.append(Self.outcome(metric, victimAlone: base, victim: v, aggressorRan: ar != nil, aggressor: verdict.text, details: details))
        }
        return out
    }

    /// One repeat's result for an aggressor. A slowdown is a number only when both ran: a victim
    /// that died has no speed (a "100 %" would average with real slowdowns into nonsense), and a
    /// victim beside an aggressor that never ran measured nothing about the aggressor.
    static func outcome(_ metric: Metric, victimAlone base: Double, victim v: (eps: Double?, status: String), aggressorRan: Bool,
                        aggressor: String, details: [String: String]) -> Measurement {
        var details = details
        guard aggressorRan else { return .failed(metric, "aggressor \(aggressor)", details: details) }
        guard let eps = v.eps else { return .failed(metric, "victim died (\(v.status)); aggressor: \(aggressor)", details: details) }
        details["victimBeside"] = String(format: "%.1f", eps)
        return Measurement(metric, (base - eps) / base * 100, details: details)
    }

    /// The host survived if this process still runs, can start a program and has memory left.
    static func hostCheck() -> String {
        let avail = ProcessMemory.memAvailable() ?? 0
        let spawns = (try? ProcessRunner.run(["true"], timeout: 10))?.status == 0
        return spawns ? "survived (MemAvailable \(avail / 1_048_576) MiB after)" : "degraded: cannot start a process"
    }
}
