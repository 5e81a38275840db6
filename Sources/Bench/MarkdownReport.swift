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
        if let audit = r.audit { md += "\n" + renderAudit(audit) }
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

extension MarkdownReport {
    /// The isolation audit: a column per backend, a row per check, as each instance saw it.
    public static func renderAudit(_ a: AuditRecord) -> String {
        var md = "## Isolation audit\n\n"
        md += "What an instance sees and may do, measured from inside it by the probe (/usr/bin/mvm-audit). "
        md += "Host: kernel \(a.host.release ?? "?") (\(escape(a.host.version ?? "?"))), boot ID \(a.host.bootID ?? "?").\n\n"
        md += "| check | " + a.entries.map(\.backend).joined(separator: " | ") + " |\n"
        md += "|---|" + a.entries.map { _ in "---" }.joined(separator: "|") + "|\n"
        md += "| probe | " + a.entries.map { escape(probeStatus($0)) }.joined(separator: " | ") + " |\n"
        for (title, value) in auditRows(a) {
            md += "| \(escape(title)) | " + a.entries.map { e in e.probe.map { escape(value(e, $0)) } ?? "—" }.joined(separator: " | ") + " |\n"
        }
        return md
    }

    /// The audit's rows: a title and the cell for an entry whose probe ran.
    static func auditRows(_ a: AuditRecord) -> [(String, (AuditEntry, ProbeReport) -> String)] {
        func yesNo(_ b: Bool?, _ yes: String, _ no: String) -> String { b.map { $0 ? yes : no } ?? "?" }
        var rows: [(String, (AuditEntry, ProbeReport) -> String)] = [
            ("kernel (uname -r)", { _, p in p.kernel.release ?? "?" }),
            ("kernel is", { e, _ in yesNo(e.sharesHostKernel, "the host's", "its own") }),
            ("kernel build (uname -v)", { _, p in p.kernel.version ?? "?" }),
            ("PID namespace", { e, _ in yesNo(e.seesHostPIDs, "the host's: host processes visible", "its own") }),
            ("processes visible", { _, p in "\(p.processes.visible)" }),
            ("pid 1 (comm); probe's pid", { _, p in "\(p.processes.pid1 ?? "?"); \(p.processes.selfPID)" }),
            ("uid; CapEff", { _, p in "\(p.identity.uid); \(p.identity.capEff ?? "?")" }),
            ("seccomp mode; no_new_privs", { _, p in "\(seccompMode(p.identity.seccomp)); \(p.identity.noNewPrivs ?? "?")" }),
            ("/dev entries", { _, p in "\(p.devices.count)" }),
            ("block devices", { _, p in p.devices.block.isEmpty ? "none" : p.devices.block.replacingOccurrences(of: ",", with: ", ") }),
        ]
        let seen = Set(a.entries.flatMap { $0.probe?.devices.sensitive.keys.map { $0 } ?? [] })
        for d in ProbeReport.sensitiveDevices.filter(seen.contains) + seen.subtracting(ProbeReport.sensitiveDevices).sorted() {
            rows.append(("/dev/\(d)", { _, p in p.devices.sensitive[d] ?? "?" }))
        }
        rows += [
            ("/proc/kcore", { _, p in p.host.procKcore ?? "?" }),
            ("/sys/firmware", { _, p in p.host.sysFirmware ?? "?" }),
            ("/sys/fs/cgroup", { _, p in "\(p.host.cgroupRoot ?? "?"), \(p.host.cgroupDirs) cgroups below" }),
            ("own cgroup (/proc/self/cgroup)", { _, p in p.host.selfCgroup ?? "none" }),
        ]
        let tried = Set(a.entries.flatMap { $0.probe?.syscalls.keys.map { $0 } ?? [] })
        let known = ProbeReport.syscallChecks.map(\.key)
        for (key, title) in ProbeReport.syscallChecks where tried.contains(key) {
            rows.append((title, { _, p in p.syscalls[key] ?? "not reported" }))
        }
        for key in tried.subtracting(known).sorted() { rows.append((key, { _, p in p.syscalls[key] ?? "not reported" })) }
        return rows
    }

    static func probeStatus(_ e: AuditEntry) -> String {
        switch e.status {
        case .ok: return e.note.map { "ok (\($0))" } ?? "ok"
        case .unavailable: return "unavailable: " + (e.note ?? "?")
        case .failed: return "failed: " + String((e.note ?? "?").prefix(160))
        }
    }

    static func seccompMode(_ s: String?) -> String {
        switch s {
        case "0": return "none"
        case "1": return "strict"
        case "2": return "filter"
        default: return s ?? "?"
        }
    }
}
