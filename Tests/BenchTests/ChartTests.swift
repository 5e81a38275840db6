import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import Testing
import MicroVMCore
@testable import Bench

/// An SVG chart parsed, with its elements by class.
struct ParsedChart {
    let all: [XMLElement]
    init(_ svg: String) throws {
        let doc = try XMLDocument(xmlString: svg)
        guard let root = doc.rootElement() else { throw MicroVMError.invalidArgument("no root element") }
        func walk(_ e: XMLElement) -> [XMLElement] { [e] + (e.children ?? []).compactMap { $0 as? XMLElement }.flatMap(walk) }
        all = walk(root)
    }
    // attribute(forName:) misses attributes of namespaced elements in swift-corelibs-foundation.
    func attr(_ e: XMLElement, _ name: String) -> String? { e.attributes?.first { $0.name == name }?.stringValue }
    func elements(_ cls: String) -> [XMLElement] { all.filter { attr($0, "class") == cls } }
    func barHeights() -> [String: Double] {
        Dictionary(uniqueKeysWithValues: elements("bar").compactMap { b -> (String, Double)? in
            guard let n = attr(b, "data-backend"), let h = attr(b, "height").flatMap(Double.init) else { return nil }
            return (n, h)
        })
    }
}

@Suite struct ChartTests {
    /// Start latency: 9 ms native, 120 ms runc, 11 s hosted under TCG, 150 ms direct on hardware KVM.
    static func startReport(hosted: Double = 11_000) -> BenchReport {
        var r = Fixtures.report()
        let m = Metric("start-serial", "Start latency (serial launches)", unit: "ms", higherIsBetter: false)
        func cell(_ b: String, _ v: Double) -> Cell {
            Cell(scenario: "start", metric: m.id, title: m.title, unit: m.unit, higherIsBetter: false, backend: b, status: .ok,
                 samples: [v * 0.95, v, v * 1.05])
        }
        r.backends = [BackendRecord(name: "native", mode: .native, acceleration: "none", available: true),
                      BackendRecord(name: "runc", mode: .container, acceleration: "none", available: true),
                      BackendRecord(name: "hosted", mode: .hosted, acceleration: "TCG", available: true),
                      BackendRecord(name: "direct", mode: .direct, acceleration: "hardware KVM", available: true)]
        r.cells = BenchRunner.withRatios([cell("native", 9), cell("runc", 120), cell("hosted", hosted), cell("direct", 150)])
        return r
    }

    @Test func wideSpansGetALogAxisThatSaysSo() throws {
        let svg = try #require(SVGChart.render(Self.startReport(), scenario: "start", metric: "start-serial"))
        let chart = try ParsedChart(svg)
        let scale = try #require(chart.elements("scale").first)
        #expect(chart.attr(scale, "data-scale") == "log")
        #expect(scale.stringValue?.contains("log scale") == true)
        #expect(chart.elements("ylabel").first?.stringValue?.contains("log scale") == true)
        // Ticks are powers of ten covering 9 ms to 11 s.
        let ticks = chart.elements("tick").compactMap(\.stringValue)
        #expect(ticks == ["1", "10", "100", "1000", "10000", "100000"])
        let h = chart.barHeights()
        // Native stays visible (on a linear axis it would be under 0.1 % of the hosted bar), and the
        // bars keep their order; on a log axis equal ratios are equal height differences.
        let native = try #require(h["native"]), runc = try #require(h["runc"]), hosted = try #require(h["hosted"])
        #expect(native > hosted * 0.1)
        #expect(native < runc && runc < hosted)
        let perDecade = (hosted - native) / log10(11_000.0 / 9)
        #expect(abs((runc - native) - perDecade * log10(120.0 / 9)) < 0.5)
    }

    @Test func narrowSpansStayLinear() throws {
        let svg = try #require(SVGChart.render(Fixtures.report(), scenario: "cpu", metric: "sysbench-cpu"))
        let chart = try ParsedChart(svg)
        #expect(chart.elements("scale").isEmpty)
        #expect(chart.elements("ylabel").first?.stringValue?.contains("log") == false)
        #expect(chart.elements("tick").first?.stringValue == "0")
        let h = chart.barHeights()
        #expect(abs((h["runc"] ?? 0) / (h["native"] ?? 1) - 2) < 0.01)
        // Just under the threshold (×100): linear.
        let under = try ParsedChart(try #require(SVGChart.render(Self.startReport(hosted: 850), scenario: "start", metric: "start-serial")))
        #expect(under.elements("scale").isEmpty)
    }

    @Test func everyVMBarNamesItsAcceleration() throws {
        let chart = try ParsedChart(try #require(SVGChart.render(Self.startReport(), scenario: "start", metric: "start-serial")))
        let accel = Dictionary(uniqueKeysWithValues: chart.elements("accel").compactMap { e in
            chart.attr(e, "data-backend").map { ($0, e.stringValue ?? "") }
        })
        #expect(accel == ["hosted": "TCG", "direct": "hardware KVM"])
        // An unavailable VM still says what it would have measured on.
        let fixture = try ParsedChart(try #require(SVGChart.render(Fixtures.report(), scenario: "cpu", metric: "sysbench-cpu")))
        #expect(fixture.elements("accel").compactMap(\.stringValue) == ["emulated KVM"])
    }

    @Test func partialAndFailedCellsHaveNoBar() throws {
        var r = Self.startReport()
        r.cells = r.cells.map { c in
            guard c.backend == "hosted" else { return c }
            return Cell(scenario: c.scenario, metric: c.metric, title: c.title, unit: c.unit, higherIsBetter: false, backend: "hosted",
                        status: .ok, samples: [11_000], attempts: 3, successes: 1, failures: ["repeat 2: x", "repeat 3: x"])
        }
        let chart = try ParsedChart(try #require(SVGChart.render(r, scenario: "start", metric: "start-serial")))
        #expect(chart.barHeights()["hosted"] == nil)
        let na = chart.elements("na").first { chart.attr($0, "data-backend") == "hosted" }
        #expect(na?.stringValue == "partial (1/3 ok)")
    }

    /// The reclaim scenario's series: one line per backend and variant, scaled into the plot,
    /// labelled with the balloon the instance had; the scalar cells still get their bar charts.
    @Test func seriesBecomeOneLinePerBackendAndVariant() throws {
        var r = Fixtures.report()
        func cell(_ metric: Metric, _ backend: String, balloon: String, _ series: String) -> Cell {
            Cell(scenario: "reclaim", metric: metric.id, title: metric.title, unit: metric.unit, higherIsBetter: metric.higherIsBetter,
                 backend: backend, status: .ok, samples: [50], details: [["series": series, "balloon": balloon]])
        }
        r.cells += [cell(MemoryReclaim.returned, "hosted", balloon: "free page reporting", "0:100,1:400,2:120"),
                    cell(MemoryReclaim.held, "hosted", balloon: "free page reporting", "0:100,1:400,2:120"),
                    cell(MemoryReclaim.returnedWithoutBalloon, "hosted", balloon: "none", "0:100,1:400,2:400"),
                    cell(MemoryReclaim.returned, "runc", balloon: "none", "0:10,1:300,2:10")]
        let chart = try ParsedChart(try #require(SVGChart.renderSeries(r, scenario: "reclaim")))
        let lines = chart.elements("series")
        #expect(lines.compactMap { chart.attr($0, "data-label") } == ["hosted (balloon, free page reporting)", "hosted (no balloon)", "runc (no balloon)"])
        for l in lines {
            let points = (chart.attr(l, "points") ?? "").split(separator: " ").map { $0.split(separator: ",").compactMap { Double($0) } }
            #expect(points.count == 3 && points.allSatisfy { $0.count == 2 && (70...530).contains($0[0]) && (50...370).contains($0[1]) })
        }
        #expect(SVGChart.renderSeries(Fixtures.report(), scenario: "cpu") == nil, "no series, no chart")
    }
}
