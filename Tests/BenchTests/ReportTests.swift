import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import Testing
import MicroVMCore
import KVM
@testable import Bench

@Suite struct ReportTests {
    @Test func jsonRoundTripKeepsSamplesAndRefusesOtherVersions() throws {
        let r = Fixtures.report()
        let data = try r.encoded()
        let back = try BenchReport.decode(data)
        #expect(back.schemaVersion == 2)
        #expect(back.cells == r.cells)
        #expect(back.backends == r.backends)
        #expect(back.host == r.host)
        #expect(back.config == r.config)
        #expect(back.cell(scenario: "cpu", metric: "sysbench-cpu", backend: "runc")?.samples == [200, 204, 196])
        var obj = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        // Version 1 counted any sample as ok: its cells cannot be read as version 2's.
        for other in [1, 3] {
            obj["schemaVersion"] = other
            let data = try JSONSerialization.data(withJSONObject: obj)
            #expect(throws: MicroVMError.self) { try BenchReport.decode(data) }
        }
        let native = try #require(back.cell(scenario: "cpu", metric: "sysbench-cpu", backend: "native"))
        #expect(native.attempts == 3 && native.successes == 3 && native.failures.isEmpty && native.sampleRepeats == [1, 2, 3])
        #expect(throws: MicroVMError.self) { try BenchReport.decode(Data("not json".utf8)) }
    }

    @Test func markdownTableHasEveryBackendRatiosAndReasons() {
        let md = MarkdownReport.render(Fixtures.report())
        let lines = md.split(separator: "\n").map(String.init)
        let header = lines.first { $0.hasPrefix("| scenario | metric") }
        #expect(header?.contains("| native | runc | direct |") == true)
        let row = lines.first { $0.hasPrefix("| cpu |") }
        #expect(row != nil)
        // Columns: scenario, metric, unit, then one per backend.
        let cols = row?.split(separator: "|", omittingEmptySubsequences: false).map { $0.trimmingCharacters(in: .whitespaces) } ?? []
        #expect(cols.count == 8)
        #expect(cols.count > 6 && cols[4].hasPrefix("100.0 (p99") && cols[4].hasSuffix("×1.00"))
        #expect(cols.count > 6 && cols[5].hasPrefix("200.0 (p99") && cols[5].hasSuffix("×2.00"))
        #expect(cols.count > 6 && cols[6] == "unavailable (see Backends)")
        #expect(md.contains("| direct | direct | emulated KVM | — | unavailable: host KVM is emulated"))
        #expect(md.contains("| runc | container | none | 3 | available |"))
    }

    @Test func svgIsWellFormedWithBarsAndErrorBarsPerBackend() throws {
        let svg = try #require(SVGChart.render(Fixtures.report(), scenario: "cpu", metric: "sysbench-cpu"))
        let doc = try XMLDocument(xmlString: svg)
        let root = try #require(doc.rootElement())
        #expect(root.name == "svg")
        func walk(_ e: XMLElement) -> [XMLElement] { [e] + (e.children ?? []).compactMap { $0 as? XMLElement }.flatMap(walk) }
        let all = walk(root)
        // attribute(forName:) misses attributes of namespaced elements in swift-corelibs-foundation.
        func attr(_ e: XMLElement, _ name: String) -> String? { e.attributes?.first { $0.name == name }?.stringValue }
        func elements(_ cls: String) -> [XMLElement] { all.filter { attr($0, "class") == cls } }
        let bars = elements("bar")
        #expect(bars.compactMap { attr($0, "data-backend") }.sorted() == ["native", "runc"])
        let errs = elements("errorbar")
        #expect(errs.compactMap { attr($0, "data-backend") }.sorted() == ["native", "runc"])
        #expect(errs.allSatisfy { $0.children?.count == 3 })
        let na = elements("na")
        #expect(na.compactMap { attr($0, "data-backend") } == ["direct"])
        let swatches = elements("legend-swatch")
        #expect(swatches.count == 3)
        #expect(elements("ylabel").first?.stringValue?.contains("events/s") == true)
        #expect(elements("title").first?.stringValue == "CPU throughput")
        // The taller bar is the higher median.
        let heights = Dictionary(uniqueKeysWithValues: bars.compactMap { b -> (String, Double)? in
            guard let n = attr(b, "data-backend"), let h = attr(b, "height").flatMap(Double.init) else { return nil }
            return (n, h)
        })
        #expect((heights["runc"] ?? 0) > (heights["native"] ?? 0) * 1.9)
    }

    @Test func writesAllFiles() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("bench-out-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let files = try BenchOutput.write(Fixtures.report(), to: dir)
        #expect(try BenchReport.load(path: files.json).cells.count == 3)
        #expect(files.charts.count == 1)
        #expect(FileManager.default.fileExists(atPath: files.markdown))
    }
}

@Suite struct LabelTests {
    @Test func tcgIsNeverLabelledKVM() {
        for verdict in [KVMProbeResult.Verdict.emulated, .absent] {
            let hosted = BackendCatalog.acceleration(mode: .hosted, kvm: verdict)
            #expect(hosted == "TCG")
            #expect(!hosted.contains("KVM"))
        }
        #expect(BackendCatalog.acceleration(mode: .hosted, kvm: .hardware, inRig: false) == "hardware KVM")
        #expect(BackendCatalog.acceleration(mode: .direct, kvm: .hardware, inRig: true) == BackendCatalog.nestedKVM)
        #expect(BackendCatalog.acceleration(mode: .hosted, kvm: .emulated, inRig: true) == "TCG")
        #expect(BackendCatalog.acceleration(mode: .direct, kvm: .emulated) == "emulated KVM")
        #expect(BackendCatalog.acceleration(mode: .container, kvm: .hardware) == "none")
        #expect(BackendCatalog.acceleration(mode: .native, kvm: .hardware) == "none")
    }

    @Test func unavailableBackendsAreListedWithReasons() throws {
        let host = try Fixtures.host(kvm: "emulated", runcUsable: false)
        let names = ["native", "runc", "docker", "hosted", "direct"]
        let targets = BackendCatalog.targets(names, host: host, factories: [:])
        #expect(targets.map(\.name) == names)  // none dropped
        let byName = Dictionary(uniqueKeysWithValues: targets.map { ($0.name, $0.record) })
        #expect(byName["native"]?.available == true)
        #expect(byName["direct"]?.available == false)
        #expect(byName["direct"]?.unavailableReason?.hasPrefix("host KVM is emulated (") == true)
        #expect(byName["direct"]?.unavailableReason?.contains("mvm rig run") == true)
        #expect(byName["runc"]?.unavailableReason?.contains("runc version 1.1.5") == true)
        #expect(byName["docker"]?.unavailableReason?.contains("not running") == true)
        // Usable on the host but not built in: still listed, with that reason.
        #expect(byName["hosted"]?.unavailableReason?.contains("built without") == true)
        #expect(byName["hosted"]?.acceleration == "TCG")
        let hw = BackendCatalog.targets(["direct"], host: try Fixtures.host(kvm: "hardware"), factories: [:])
        #expect(hw.first?.record.acceleration == "hardware KVM")
    }

    @Test func runnerLabelsFailuresAndComputesRatios() async throws {
        let host = try Fixtures.host(kvm: "emulated")
        let targets = BackendCatalog.targets(["native", "runc", "hosted", "direct"], host: host, factories: [
            "runc": { CannedBackend(mode: .container, eventsPerSecond: 50) },
            "hosted": { CannedBackend(mode: .hosted, eventsPerSecond: 1, fail: true) },
        ])
        // Swap native for a canned one so the ratio is known.
        var t = targets
        t[0] = BenchTarget(record: t[0].record, backend: CannedBackend(mode: .native, eventsPerSecond: 100))
        let plan = BenchPlan(scenarios: [CPUThroughput()], targets: t, repeats: 3,
                             context: BenchContext(workload: .host, slice: Fixtures.slice, durations: .quick))
        let lines = ProgressLines()
        let report = await BenchRunner(plan: plan, progress: { lines.add($0) }).run(hostRecord: Fixtures.hostRecord)
        #expect(report.cells.count == 4)
        let runc = try #require(report.cell(scenario: "cpu", metric: "sysbench-cpu", backend: "runc"))
        #expect(runc.samples == [50, 50, 50])
        #expect(runc.ratioToNative?.median == 0.5)
        let hosted = try #require(report.cell(scenario: "cpu", metric: "sysbench-cpu", backend: "hosted"))
        #expect(hosted.status == .failed)
        #expect(hosted.attempts == 3 && hosted.successes == 0)
        #expect(hosted.failures.count == 3 && hosted.failures.allSatisfy { $0.contains("canned failure") })
        #expect(hosted.warmup?.failure?.contains("canned failure") == true)
        #expect(hosted.stats == nil && hosted.ratioToNative == nil)
        #expect(hosted.note?.contains("canned failure") == true)
        // The warm-up ran and was discarded: three samples from three repeats, not four.
        #expect(runc.warmup?.samples == [50])
        #expect(runc.sampleRepeats == [1, 2, 3])
        let direct = try #require(report.cell(scenario: "cpu", metric: "sysbench-cpu", backend: "direct"))
        #expect(direct.status == .unavailable)
        #expect(direct.note?.contains("emulated") == true)
        #expect(lines.all.contains { $0.contains("cpu on runc, repeat 2/3") && $0.contains("left") })
    }
}

final class ProgressLines: @unchecked Sendable {
    private let lock = NSLock()
    private var lines: [String] = []
    func add(_ s: String) { lock.withLock { lines.append(s) } }
    var all: [String] { lock.withLock { lines } }
}
