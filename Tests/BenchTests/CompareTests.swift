import Foundation
import Testing
import MicroVMCore
@testable import Bench

/// Recorded runs made up from a seeded generator, shaped like the bench's: interleaved rounds, each
/// round slowed or sped up for every backend alike (drift within a run), the whole run scaled by a
/// factor of its own (drift between runs, ±20 % on the shared host), each sample with its own noise.
enum SyntheticRuns {
    static let backends: [(String, RunMode, String)] = [("native", .native, "none"), ("runc", .container, "none"),
                                                        ("docker", .container, "none"), ("hosted", .hosted, "TCG"), ("direct", .direct, "hardware KVM")]
    /// id, unit, higher is better, and each backend's typical value.
    static let metrics: [(String, String, Bool, [Double])] = [
        ("sysbench-cpu", "events/s", true, [1000, 980, 970, 300, 950]),
        ("start-serial", "ms", false, [9, 120, 400, 11000, 150]),
        ("syscall-sched-yield", "ns/syscall", false, [300, 320, 330, 2000, 400]),
        ("sysbench-memory", "MiB/s", true, [5000, 4900, 4800, 900, 4700]),
    ]

    /// `change[backend/metric]` multiplies that cell's true value (a real change in the tree).
    static func run(_ g: inout SeededGenerator, drift: Double, repeats: Int, noise: Double = 0.05,
                    change: [String: Double] = [:], host: HostRecord = Fixtures.hostRecord) -> BenchReport {
        var cells: [Cell] = []
        for (id, unit, higher, typical) in metrics {
            let rounds = (0..<repeats).map { _ in Double.random(in: 0.9...1.1, using: &g) }
            for (i, (name, _, _)) in backends.enumerated() {
                let truth = typical[i] * (change["\(name)/\(id)"] ?? 1)
                let samples = rounds.map { r in truth * drift * r * Double.random(in: (1 - noise)...(1 + noise), using: &g) }
                cells.append(Cell(scenario: "s", metric: id, title: id, unit: unit, higherIsBetter: higher, backend: name, status: .ok,
                                  samples: samples, details: samples.map { _ in [:] }))
            }
        }
        let config = RunConfigRecord(preset: "quick", repeats: repeats, scenarios: ["s"], profile: "bench", slice: Fixtures.slice,
                                     workload: "test", guestKernel: nil, durations: BenchDurations.quick.asDictionary, order: "interleaved")
        return BenchReport(host: host, config: config, backends: backends.map { BackendRecord(name: $0.0, mode: $0.1, acceleration: $0.2, available: true) },
                           cells: BenchRunner.withRatios(cells))
    }
}

@Suite struct CompareTests {
    /// Two runs of one tree, ±20 % apart as a whole: at most one cell in twenty may be called changed.
    @Test func twoRunsOfOneTreeAreAlmostNeverCalledChanged() throws {
        var g = SeededGenerator(seed: 20_240_601)
        var cells = 0, flagged: [String] = [], rawMoved = 0
        for _ in 0..<15 {
            let a = SyntheticRuns.run(&g, drift: 1, repeats: 5)
            let b = SyntheticRuns.run(&g, drift: Double.random(in: 0.8...1.2, using: &g), repeats: 5)
            for c in try BenchComparison.compare(a, b) {
                cells += 1
                if c.verdict.isChange { flagged.append("\(c.backend)/\(c.metric) \(c.reason)") }
                if abs(c.changePercent ?? 0) > 5 { rawMoved += 1 }
                #expect(c.basis == (c.backend == "native" ? .raw : .ratioToNative))
            }
        }
        #expect(cells == 300)
        #expect(flagged.count * 20 <= cells, "\(flagged.count) of \(cells) flagged: \(flagged)")
        // The drift was there to be fooled by: raw medians moved beyond the floor in many cells.
        #expect(rawMoved * 3 > cells, "raw medians moved > 5 % in only \(rawMoved) of \(cells) cells")
    }

    @Test func aRealThirtyPercentChangeIsFlagged() throws {
        var g = SeededGenerator(seed: 42)
        for trial in 0..<5 {
            let a = SyntheticRuns.run(&g, drift: 1, repeats: 10)
            let b = SyntheticRuns.run(&g, drift: Double.random(in: 0.8...1.2, using: &g), repeats: 10,
                                      change: ["runc/sysbench-cpu": 0.7, "hosted/start-serial": 1.3])
            let changes = try BenchComparison.compare(a, b)
            let cpu = try #require(changes.first { $0.backend == "runc" && $0.metric == "sysbench-cpu" })
            #expect(cpu.verdict == .worse, "trial \(trial): \(cpu.reason)")
            #expect(abs((cpu.effect ?? 0) + 30) < 8, "trial \(trial): effect \(cpu.effect ?? .nan)")
            let start = try #require(changes.first { $0.backend == "hosted" && $0.metric == "start-serial" })
            #expect(start.verdict == .worse, "trial \(trial): \(start.reason)")
            #expect(changes.filter { $0.verdict.isChange }.count <= 3, "\(changes.filter { $0.verdict.isChange }.map(\.reason))")
        }
    }

    @Test func fewerThanFiveRepeatsAreTooFewWhateverTheChange() throws {
        var g = SeededGenerator(seed: 1)
        let a = SyntheticRuns.run(&g, drift: 1, repeats: 4)
        let b = SyntheticRuns.run(&g, drift: 1, repeats: 4, change: ["runc/sysbench-cpu": 0.5])
        let changes = try BenchComparison.compare(a, b)
        #expect(changes.allSatisfy { $0.verdict == .tooFewSamples })
        #expect(changes.first { $0.backend == "runc" && $0.metric == "sysbench-cpu" }?.counts == [4, 4])
    }

    @Test func failuresAreVerdictsNotDropped() throws {
        var g = SeededGenerator(seed: 3)
        let a = SyntheticRuns.run(&g, drift: 1, repeats: 5)
        var b = SyntheticRuns.run(&g, drift: 1, repeats: 5)
        func breakCell(_ r: inout BenchReport, _ backend: String, _ metric: String, successes: Int) {
            let i = r.cells.firstIndex { $0.backend == backend && $0.metric == metric }!
            let c = r.cells[i]
            let failures = (successes + 1...5).map { "repeat \($0): boot timed out" }
            r.cells[i] = Cell(scenario: c.scenario, metric: c.metric, title: c.title, unit: c.unit, higherIsBetter: c.higherIsBetter,
                              backend: backend, status: .ok, note: "boot timed out", samples: Array(c.samples.prefix(successes)),
                              attempts: 5, successes: successes, failures: failures)
        }
        breakCell(&b, "hosted", "start-serial", successes: 0)
        breakCell(&b, "direct", "start-serial", successes: 2)
        var a2 = a
        breakCell(&a2, "runc", "sysbench-cpu", successes: 1)
        let changes = try BenchComparison.compare(a2, b)
        #expect(changes.count == a.cells.count)
        #expect(changes.first { $0.backend == "hosted" && $0.metric == "start-serial" }?.verdict == .nowFailing)
        let partial = changes.first { $0.backend == "direct" && $0.metric == "start-serial" }
        #expect(partial?.verdict == .nowFailing && partial?.afterStatus == .partial)
        #expect(changes.first { $0.backend == "runc" && $0.metric == "sysbench-cpu" }?.verdict == .nowOK)
        let md = BenchComparison.markdown(changes)
        #expect(md.contains("ok → failed") && md.contains("failed → ok"))
        // A cell in one file only is listed too.
        var c = b
        c.cells.removeAll { $0.backend == "docker" && $0.metric == "sysbench-cpu" }
        let gone = try BenchComparison.compare(a, c).first { $0.backend == "docker" && $0.metric == "sysbench-cpu" }
        #expect(gone?.verdict == .notCompared && gone?.reason == "only in the earlier file")
    }

    @Test func differentHostsAreRefusedUnlessAllowed() throws {
        var g = SeededGenerator(seed: 5)
        let a = SyntheticRuns.run(&g, drift: 1, repeats: 5)
        var other = Fixtures.hostRecord
        other.cpuModel = "Other CPU"; other.cores = 8
        let b = SyntheticRuns.run(&g, drift: 1, repeats: 5, host: other)
        do {
            _ = try BenchComparison.compare(a, b)
            Issue.record("results from different hosts were compared")
        } catch let e as MicroVMError {
            #expect(e.code == .invalidArgument)
            #expect("\(e)".contains("different hosts") && "\(e)".contains("Other CPU") && "\(e)".contains("--allow-different-hosts"))
        }
        #expect(try BenchComparison.compare(a, b, options: .init(allowDifferentHosts: true)).count == a.cells.count)
        // Only the machine counts: the KVM probe's wording may differ between runs.
        var same = Fixtures.hostRecord
        same.kvmReason = "another measurement"
        #expect(throws: Never.self) { try BenchComparison.checkSameHost(Fixtures.hostRecord, same) }
        var newKernel = Fixtures.hostRecord
        newKernel.kernel = "6.2.0"
        #expect(throws: MicroVMError.self) { try BenchComparison.checkSameHost(Fixtures.hostRecord, newKernel) }
    }

    @Test func nativeIsComparedRawAgainstTheRawFloor() throws {
        var g = SeededGenerator(seed: 9)
        let a = SyntheticRuns.run(&g, drift: 1, repeats: 8, noise: 0.01)
        // The whole machine 20 % slower: every raw value moves, no ratio does.
        let b = SyntheticRuns.run(&g, drift: 0.8, repeats: 8, noise: 0.01)
        let changes = try BenchComparison.compare(a, b)
        let native = try #require(changes.first { $0.backend == "native" && $0.metric == "sysbench-cpu" })
        #expect(native.basis == .raw)
        #expect(native.verdict == .withinNoise)
        #expect(native.reason.contains("native is the baseline"))
        #expect(abs((native.changePercent ?? 0) + 20) < 6)
        // With the raw floor lowered below the drift, the same drift is called a change: the floor is what guards native.
        let strict = try BenchComparison.compare(a, b, options: .init(rawFloorPercent: 5))
        #expect(strict.first { $0.backend == "native" && $0.metric == "sysbench-cpu" }?.verdict == .worse)
        #expect(changes.filter { $0.backend != "native" }.allSatisfy { $0.basis == .ratioToNative && !$0.verdict.isChange })
    }
}
