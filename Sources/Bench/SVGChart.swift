import Foundation
import MicroVMCore

/// A small SVG writer for the bench charts: one bar chart per metric, bars at the median, error
/// bars from min to max, a y axis with its unit, backend names under the bars and a legend.
/// Unavailable, failed and partial cells keep their slot with a note, so a missing bar is never
/// silent. Every VM bar names its acceleration under it (a TCG bar is not a KVM bar), and where
/// the medians span more than two orders of magnitude the axis is logarithmic and says so: on a
/// linear axis 9 ms native next to 11 s under TCG leaves native without a visible bar.
public enum SVGChart {
    static let palette = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1", "#edc948"]

    /// Above this max/min ratio of the plotted values the axis is logarithmic.
    static let logSpan = 100.0

    /// How values map to heights: linear from 0, or log10 between two powers of ten.
    enum Axis: Equatable {
        case linear(max: Double, step: Double)
        case log(lowExponent: Int, highExponent: Int)

        /// Log when the medians (the bars) span more than `logSpan`; the axis covers every value drawn.
        static func choose(medians: [Double], values: [Double]) -> Axis {
            let v = values.filter { $0.isFinite }, bars = medians.filter { $0.isFinite }
            if let lo = v.min(), let hi = v.max(), lo > 0, let blo = bars.min(), let bhi = bars.max(), bhi / blo > SVGChart.logSpan {
                return .log(lowExponent: Int(floor(log10(lo))), highExponent: Int(ceil(log10(hi * 1.1))))
            }
            let (m, s) = SVGChart.niceAxis(v.max() ?? 0)
            return .linear(max: m, step: s)
        }

        /// 0 at the axis bottom, 1 at its top.
        func fraction(_ v: Double) -> Double {
            switch self {
            case .linear(let m, _): return m > 0 ? Swift.max(0, v) / m : 0
            case .log(let lo, let hi):
                guard v > 0 else { return 0 }
                return Swift.min(1, Swift.max(0, (log10(v) - Double(lo)) / Double(Swift.max(1, hi - lo))))
            }
        }

        var ticks: [Double] {
            switch self {
            case .linear(let m, let step):
                guard step > 0 else { return [] }
                return Array(stride(from: 0.0, through: m + step / 2, by: step))
            case .log(let lo, let hi): return (lo...hi).map { pow(10, Double($0)) }
            }
        }

        func label(_ t: Double) -> String {
            switch self {
            case .linear(_, let step): return String(format: step >= 1 ? "%.0f" : (step >= 0.1 ? "%.1f" : "%.2f"), t)
            case .log: return t >= 1 ? String(format: "%.0f", t) : String(format: "%g", t)
            }
        }
    }

    public static func render(_ r: BenchReport, scenario: String, metric: String) -> String? {
        let cells = r.backends.map { b in (b, r.cell(scenario: scenario, metric: metric, backend: b.name)) }
        guard let first = cells.compactMap(\.1).first else { return nil }
        let w = 720.0, h = 400.0, left = 80.0, right = 200.0, top = 50.0, bottom = 70.0
        let plotW = w - left - right, plotH = h - top - bottom
        let stats = cells.compactMap { $0.1?.status == .ok ? $0.1?.stats : nil }
        let axis = Axis.choose(medians: stats.map(\.median), values: stats.flatMap { [$0.min, $0.median, $0.max] })
        let isLog = if case .log = axis { true } else { false }
        func y(_ v: Double) -> Double { top + plotH - axis.fraction(v) * plotH }
        var s = """
        <?xml version="1.0" encoding="UTF-8"?>
        <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(w))" height="\(Int(h))" viewBox="0 0 \(Int(w)) \(Int(h))" font-family="sans-serif" font-size="12">
        <rect x="0" y="0" width="\(Int(w))" height="\(Int(h))" fill="white"/>
        <text class="title" x="\(Int(w / 2))" y="24" text-anchor="middle" font-size="15" font-weight="bold">\(xml(first.title))</text>

        """
        if isLog {
            s += "<text class=\"scale\" data-scale=\"log\" x=\"\(Int(w / 2))\" y=\"40\" text-anchor=\"middle\" font-size=\"11\" fill=\"#a00\">log scale: each gridline is ×10 (medians span more than ×\(Int(logSpan)))</text>\n"
        }
        // Axes and grid.
        s += "<line class=\"axis\" x1=\"\(left)\" y1=\"\(top)\" x2=\"\(left)\" y2=\"\(top + plotH)\" stroke=\"black\"/>\n"
        s += "<line class=\"axis\" x1=\"\(left)\" y1=\"\(top + plotH)\" x2=\"\(left + plotW)\" y2=\"\(top + plotH)\" stroke=\"black\"/>\n"
        for t in axis.ticks {
            let yy = y(t)
            s += "<line x1=\"\(left - 4)\" y1=\"\(fmt(yy))\" x2=\"\(left + plotW)\" y2=\"\(fmt(yy))\" stroke=\"#ddd\"/>\n"
            s += "<text class=\"tick\" x=\"\(left - 8)\" y=\"\(fmt(yy + 4))\" text-anchor=\"end\">\(axis.label(t))</text>\n"
        }
        let better = first.higherIsBetter ? "higher is better" : "lower is better"
        s += "<text class=\"ylabel\" x=\"18\" y=\"\(fmt(top + plotH / 2))\" text-anchor=\"middle\" transform=\"rotate(-90 18 \(fmt(top + plotH / 2)))\">\(xml(first.unit)) (\(better)\(isLog ? ", log scale" : ""))</text>\n"
        s += "<text class=\"xlabel\" x=\"\(fmt(left + plotW / 2))\" y=\"\(Int(h - 8))\" text-anchor=\"middle\">backend (VMs: acceleration below; error bars: min–max of the samples)</text>\n"

        let slot = plotW / Double(max(1, cells.count))
        for (i, (b, c)) in cells.enumerated() {
            let color = palette[i % palette.count]
            let cx = left + slot * (Double(i) + 0.5)
            let bw = min(60, slot * 0.6)
            s += "<text class=\"backend\" x=\"\(fmt(cx))\" y=\"\(fmt(top + plotH + 18))\" text-anchor=\"middle\">\(xml(b.name))</text>\n"
            if b.mode.isVM {
                s += "<text class=\"accel\" data-backend=\"\(xml(b.name))\" x=\"\(fmt(cx))\" y=\"\(fmt(top + plotH + 32))\" text-anchor=\"middle\" font-size=\"10\" fill=\"#555\">\(xml(b.acceleration))</text>\n"
            }
            guard let c, c.status == .ok, let st = c.stats else {
                let why: String
                switch c?.status {
                case .failed?: why = "failed"
                case .partial?: why = "partial (\(c?.successes ?? 0)/\(c?.attempts ?? 0) ok)"
                default: why = "unavailable"
                }
                s += "<text class=\"na\" data-backend=\"\(xml(b.name))\" x=\"\(fmt(cx))\" y=\"\(fmt(top + plotH - 8))\" text-anchor=\"middle\" fill=\"#888\">\(why)</text>\n"
                continue
            }
            s += "<rect class=\"bar\" data-backend=\"\(xml(b.name))\" data-median=\"\(st.median)\" x=\"\(fmt(cx - bw / 2))\" y=\"\(fmt(y(st.median)))\" width=\"\(fmt(bw))\" height=\"\(fmt(top + plotH - y(st.median)))\" fill=\"\(color)\"/>\n"
            s += "<g class=\"errorbar\" data-backend=\"\(xml(b.name))\" data-min=\"\(st.min)\" data-max=\"\(st.max)\" stroke=\"black\" stroke-width=\"1.5\">"
            s += "<line x1=\"\(fmt(cx))\" y1=\"\(fmt(y(st.min)))\" x2=\"\(fmt(cx))\" y2=\"\(fmt(y(st.max)))\"/>"
            s += "<line x1=\"\(fmt(cx - 8))\" y1=\"\(fmt(y(st.min)))\" x2=\"\(fmt(cx + 8))\" y2=\"\(fmt(y(st.min)))\"/>"
            s += "<line x1=\"\(fmt(cx - 8))\" y1=\"\(fmt(y(st.max)))\" x2=\"\(fmt(cx + 8))\" y2=\"\(fmt(y(st.max)))\"/></g>\n"
            var label = MarkdownReport.format(st.median)
            if let ratio = c.ratioToNative, b.name != "native" { label += " ×" + String(format: "%.2f", ratio.median) }
            s += "<text class=\"value\" x=\"\(fmt(cx))\" y=\"\(fmt(min(y(st.max), y(st.median)) - 6))\" text-anchor=\"middle\" font-size=\"11\">\(xml(label))</text>\n"
        }
        // Legend: which colour is which backend, and what each one really ran on.
        let lx = left + plotW + 16
        s += "<g class=\"legend\">\n<text x=\"\(fmt(lx))\" y=\"\(fmt(top))\" font-weight=\"bold\">Backends</text>\n"
        for (i, (b, _)) in cells.enumerated() {
            let ly = top + 18 + Double(i) * 34
            s += "<rect class=\"legend-swatch\" data-backend=\"\(xml(b.name))\" x=\"\(fmt(lx))\" y=\"\(fmt(ly - 10))\" width=\"12\" height=\"12\" fill=\"\(palette[i % palette.count])\"/>"
            s += "<text x=\"\(fmt(lx + 18))\" y=\"\(fmt(ly))\">\(xml(b.name))</text>"
            s += "<text x=\"\(fmt(lx + 18))\" y=\"\(fmt(ly + 13))\" font-size=\"10\" fill=\"#555\">\(xml(b.available ? "accel: " + b.acceleration : "unavailable"))</text>\n"
        }
        s += "</g>\n</svg>\n"
        return s
    }

    /// A line chart of the time series a scenario kept in its cells' details (`series`:
    /// "seconds:value,…", the first sample of each cell): one line per backend and metric, e.g.
    /// a VM's host memory with and without its balloon. nil when no cell has a series.
    public static func renderSeries(_ r: BenchReport, scenario: String, unit: String = "MiB") -> String? {
        var lines: [(label: String, points: [(Double, Double)])] = []
        for c in r.cells where c.scenario == scenario && c.status != .unavailable {
            guard let text = c.details.first?["series"] else { continue }
            let points = text.split(separator: ",").compactMap { p -> (Double, Double)? in
                let f = p.split(separator: ":")
                guard f.count == 2, let t = Double(f[0]), let v = Double(f[1]) else { return nil }
                return (t, v)
            }
            let variant = c.details.first?["balloon"].map { $0 == "none" ? "no balloon" : "balloon, " + $0 } ?? c.metric
            let label = "\(c.backend) (\(variant))"
            if !points.isEmpty, !lines.contains(where: { $0.label == label }) { lines.append((label, points)) }
        }
        guard !lines.isEmpty else { return nil }
        let w = 760.0, h = 420.0, left = 70.0, right = 230.0, top = 50.0, bottom = 50.0
        let plotW = w - left - right, plotH = h - top - bottom
        let (xMax, xStep) = niceAxis(lines.flatMap { $0.points.map(\.0) }.max() ?? 1)
        let (yMax, yStep) = niceAxis(lines.flatMap { $0.points.map(\.1) }.max() ?? 1)
        func x(_ t: Double) -> Double { left + t / xMax * plotW }
        func y(_ v: Double) -> Double { top + plotH - v / yMax * plotH }
        var s = """
        <?xml version="1.0" encoding="UTF-8"?>
        <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(w))" height="\(Int(h))" viewBox="0 0 \(Int(w)) \(Int(h))" font-family="sans-serif" font-size="12">
        <rect x="0" y="0" width="\(Int(w))" height="\(Int(h))" fill="white"/>
        <text class="title" x="\(Int(w / 2))" y="24" text-anchor="middle" font-size="15" font-weight="bold">\(xml(scenario)): host memory over time (summed PSS of the instances)</text>

        """
        s += "<line class=\"axis\" x1=\"\(left)\" y1=\"\(top)\" x2=\"\(left)\" y2=\"\(top + plotH)\" stroke=\"black\"/>\n"
        s += "<line class=\"axis\" x1=\"\(left)\" y1=\"\(top + plotH)\" x2=\"\(left + plotW)\" y2=\"\(top + plotH)\" stroke=\"black\"/>\n"
        for t in stride(from: 0.0, through: yMax + yStep / 2, by: yStep) {
            s += "<line x1=\"\(left - 4)\" y1=\"\(fmt(y(t)))\" x2=\"\(left + plotW)\" y2=\"\(fmt(y(t)))\" stroke=\"#ddd\"/>"
            s += "<text class=\"tick\" x=\"\(left - 8)\" y=\"\(fmt(y(t) + 4))\" text-anchor=\"end\">\(String(format: "%.0f", t))</text>\n"
        }
        for t in stride(from: 0.0, through: xMax + xStep / 2, by: xStep) {
            s += "<text class=\"tick\" x=\"\(fmt(x(t)))\" y=\"\(fmt(top + plotH + 16))\" text-anchor=\"middle\">\(String(format: "%.0f", t))</text>\n"
        }
        s += "<text class=\"ylabel\" x=\"18\" y=\"\(fmt(top + plotH / 2))\" text-anchor=\"middle\" transform=\"rotate(-90 18 \(fmt(top + plotH / 2)))\">\(xml(unit)) (summed PSS)</text>\n"
        s += "<text class=\"xlabel\" x=\"\(fmt(left + plotW / 2))\" y=\"\(Int(h - 10))\" text-anchor=\"middle\">seconds since the instance's first host process</text>\n"
        s += "<g class=\"legend\">\n"
        for (i, l) in lines.enumerated() {
            let color = palette[i % palette.count]
            let path = l.points.map { "\(fmt(x($0.0))),\(fmt(y($0.1)))" }.joined(separator: " ")
            s += "<polyline class=\"series\" data-label=\"\(xml(l.label))\" points=\"\(path)\" fill=\"none\" stroke=\"\(color)\" stroke-width=\"2\"/>\n"
            let ly = top + 14 + Double(i) * 20
            s += "<rect x=\"\(fmt(left + plotW + 16))\" y=\"\(fmt(ly - 10))\" width=\"12\" height=\"12\" fill=\"\(color)\"/>"
            s += "<text x=\"\(fmt(left + plotW + 34))\" y=\"\(fmt(ly))\" font-size=\"11\">\(xml(l.label))</text>\n"
        }
        s += "</g>\n</svg>\n"
        return s
    }

    /// A round axis maximum and tick step (1, 2 or 5 × 10^n) covering `v`.
    static func niceAxis(_ v: Double) -> (Double, Double) {
        guard v > 0, v.isFinite else { return (1, 0.2) }
        let raw = v * 1.1 / 5
        let mag = pow(10, floor(log10(raw)))
        let step = [1.0, 2, 5, 10].map { $0 * mag }.first { $0 >= raw } ?? 10 * mag
        return (ceil(v * 1.1 / step) * step, step)
    }

    static func fmt(_ v: Double) -> String { String(format: "%.1f", v) }

    static func xml(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
            .replacingOccurrences(of: ">", with: "&gt;").replacingOccurrences(of: "\"", with: "&quot;")
    }
}

/// Writes a report's files: results.json, results.md and charts/<scenario>--<metric>.svg.
public enum BenchOutput {
    public struct Files: Sendable { public var json: String; public var markdown: String; public var charts: [String] }

    @discardableResult
    public static func write(_ r: BenchReport, to dir: String) throws -> Files {
        try Paths.ensureDirectory(dir + "/charts")
        let json = dir + "/results.json", md = dir + "/results.md"
        try r.encoded().write(to: URL(fileURLWithPath: json))
        try Data(MarkdownReport.render(r).utf8).write(to: URL(fileURLWithPath: md))
        var charts: [String] = []
        for (scenario, metric) in r.metrics {
            guard let svg = SVGChart.render(r, scenario: scenario, metric: metric) else { continue }
            let path = "\(dir)/charts/\(scenario)--\(metric).svg"
            try Data(svg.utf8).write(to: URL(fileURLWithPath: path))
            charts.append(path)
        }
        for scenario in Set(r.cells.filter { $0.details.contains { $0["series"] != nil } }.map(\.scenario)).sorted() {
            guard let svg = SVGChart.renderSeries(r, scenario: scenario) else { continue }
            let path = "\(dir)/charts/\(scenario)--series.svg"
            try Data(svg.utf8).write(to: URL(fileURLWithPath: path))
            charts.append(path)
        }
        return Files(json: json, markdown: md, charts: charts)
    }
}
