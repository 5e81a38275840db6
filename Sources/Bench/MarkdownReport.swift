import Foundation

/// The results as a Markdown table: one row per metric, one column per backend, each cell
/// median (p99, min–max) and the ratio to native measured in the same run.
public enum MarkdownReport {
    public static func render(_ r: BenchReport) -> String {
        var md = "# MicroVM bench results\n\n"
        md += "- Host: \(r.host.cpuModel), \(r.host.cores) cores, \(String(format: "%.1f", Double(r.host.memory.bytes) / 1_073_741_824)) GiB RAM, kernel \(r.host.kernel), KVM: \(r.host.kvm), cgroups: \(r.host.cgroupMode)\n"
        md += "- Run: \(r.config.preset), \(r.config.repeats) repeats, profile `\(r.config.profile)` (\(r.config.slice.cpus) CPU, \(r.config.slice.memory), \(r.config.slice.placement.rawValue)\(r.config.slice.pidsLimit.map { ", pids \($0)" } ?? "")), workload: \(r.config.workload)\(r.config.guestKernel.map { ", guest kernel \($0)" } ?? "")\n"
        md += "- Written \(ISO8601DateFormatter().string(from: r.createdAt)), schema version \(r.schemaVersion)\n\n"
        md += "## Backends\n\n| backend | mode | acceleration | repeats | status |\n|---|---|---|---|---|\n"
        for b in r.backends {
            let reps = r.config.repeatsByBackend?[b.name].map(String.init) ?? "\(r.config.repeats)"
            md += "| \(b.name) | \(b.mode.rawValue) | \(b.acceleration) | \(b.available ? reps : "—") | \(b.available ? "available" : "unavailable: " + escape(b.unavailableReason ?? "?")) |\n"
        }
        let names = r.backends.map(\.name)
        md += "\n## Results\n\nEach cell: median (p99; min–max) and ×ratio to native (median ratio). Repeats ran interleaved across backends after one discarded warm-up each; a cell is summarised only when more than half of its repeats succeeded (`partial` otherwise).\n\n"
        md += "| scenario | metric | unit | " + names.joined(separator: " | ") + " |\n"
        md += "|---|---|---|" + names.map { _ in "---" }.joined(separator: "|") + "|\n"
        for (scenario, metric) in r.metrics {
            guard let any = r.cells.first(where: { $0.scenario == scenario && $0.metric == metric }) else { continue }
            let better = any.higherIsBetter ? "↑" : "↓"
            var row = "| \(scenario) | \(escape(any.title)) | \(any.unit) \(better) |"
            for b in r.backends { row += " \(cellText(r.cell(scenario: scenario, metric: metric, backend: b.name), backend: b)) |" }
            md += row + "\n"
        }
        let noisy = r.cells.filter { $0.scenario == "noisy-neighbour" && $0.status != .unavailable }
        if !noisy.isEmpty {
            md += "\n## Noisy neighbour outcomes\n\n| backend | aggressor | victim | aggressor outcome | host |\n|---|---|---|---|---|\n"
            for c in noisy {
                let aggressor = c.metric.replacingOccurrences(of: "victim-slowdown-", with: "")
                for d in c.details {
                    md += "| \(c.backend) | \(aggressor) | \(escape(d["victim"] ?? "?")) | \(escape(d["aggressor"] ?? "?")) | \(escape(d["host"] ?? "?")) |\n"
                }
                // Failed repeats (a victim that died, an aggressor that never ran) are outcomes too.
                for f in c.failures { md += "| \(c.backend) | \(aggressor) | failed: \(escape(f)) | | |\n" }
            }
        }
        let notes = Dictionary(r.cells.compactMap { c in c.status == .ok ? c.note.map { (c.scenario, $0) } : nil }, uniquingKeysWith: { a, _ in a })
        if !notes.isEmpty {
            md += "\n## How each scenario measures\n\n"
            for (s, n) in notes.sorted(by: { $0.key < $1.key }) { md += "- **\(s)**: \(escape(n))\n" }
        }
        return md
    }

    static func cellText(_ c: Cell?, backend: BackendRecord? = nil) -> String {
        guard let c else { return "—" }
        switch c.status {
        case .unavailable:
            // The backend's own reason is in the Backends table; repeating it in every row hides the numbers.
            if let b = backend, !b.available, c.note == b.unavailableReason { return "unavailable (see Backends)" }
            return "unavailable: " + escape(c.note ?? "?")
        case .failed: return "failed (0 of \(c.attempts) repeats): " + escape(String((c.note ?? "?").prefix(120)))
        case .partial:
            // No median: the repeats that failed may be the cell's real behaviour.
            return "partial (\(c.successes) of \(c.attempts) repeats, no summary): " + escape(String(BenchRunner.failureNote(c.failures.last ?? "?").prefix(120)))
        case .ok:
            guard let s = c.stats else { return "—" }
            var t = "\(format(s.median)) (p99 \(format(s.p99)); \(format(s.min))–\(format(s.max)))"
            if let ratio = c.ratioToNative { t += " ×\(String(format: "%.2f", ratio.median))" }
            if c.successes < c.attempts { t += " [\(c.attempts - c.successes) of \(c.attempts) repeats failed]" }
            return t
        }
    }

    static func format(_ v: Double) -> String {
        let a = abs(v)
        if a >= 1000 { return String(format: "%.0f", v) }
        if a >= 10 { return String(format: "%.1f", v) }
        return String(format: "%.2f", v)
    }

    static func escape(_ s: String) -> String {
        s.replacingOccurrences(of: "|", with: "\\|").replacingOccurrences(of: "\n", with: " ")
    }
}
