import Foundation
import MicroVMCore

/// Parsers for the benchmark tools' text output. Instance output is untrusted: a parser returns
/// nil (and the scenario reports the output) rather than trapping on anything unexpected.
public enum ToolParsers {
    /// `sysbench cpu run`: "events per second:  2816.77".
    public static func sysbenchEventsPerSecond(_ text: String) -> Double? {
        number(after: "events per second:", in: text)
    }

    /// `sysbench memory run`: "4524.78 MiB transferred (4519.20 MiB/sec)".
    public static func sysbenchMiBPerSecond(_ text: String) -> Double? {
        for line in text.split(separator: "\n") where line.contains("MiB/sec") {
            guard let open = line.lastIndex(of: "(") else { continue }
            let inner = line[line.index(after: open)...].prefix { $0.isNumber || $0 == "." }
            if let v = Double(inner), v.isFinite { return v }
        }
        return nil
    }

    /// sysbench's "total time: 2.0040s" and "total number of events: 733".
    public static func sysbenchTotals(_ text: String) -> (seconds: Double, events: Double)? {
        guard let t = number(after: "total time:", in: text), let e = number(after: "total number of events:", in: text), t > 0 else { return nil }
        return (t, e)
    }

    /// GNU dd's summary: "200000 bytes (200 kB, 195 KiB) copied, 0.150315 s, 1.3 MB/s".
    public static func ddSeconds(_ text: String) -> Double? {
        guard let r = text.range(of: "copied, ", options: .backwards) else { return nil }
        let num = text[r.upperBound...].prefix { $0.isNumber || $0 == "." || $0 == "e" || $0 == "-" }
        return Double(num).flatMap { $0.isFinite && $0 > 0 ? $0 : nil }
    }

    /// fio `--output-format=json`: IOPS of the first job's read or write side.
    public static func fioIOPS(_ text: String, write: Bool) -> Double? {
        fioField(text, write: write, "iops")
    }

    /// fio `--output-format=json`: bytes per second of the first job's read or write side.
    public static func fioBandwidth(_ text: String, write: Bool) -> Double? {
        fioField(text, write: write, "bw_bytes")
    }

    private static func fioField(_ text: String, write: Bool, _ field: String) -> Double? {
        // fio may print notes before the JSON object.
        guard let start = text.firstIndex(of: "{"), let end = text.lastIndex(of: "}"), start < end,
              let obj = try? JSONSerialization.jsonObject(with: Data(text[start...end].utf8)) as? [String: Any],
              let jobs = obj["jobs"] as? [[String: Any]], let job = jobs.first,
              let side = job[write ? "write" : "read"] as? [String: Any] else { return nil }
        let v = (side[field] as? NSNumber)?.doubleValue
        return v.flatMap { $0.isFinite && $0 > 0 ? $0 : nil }
    }

    /// The average round trip of busybox's (`round-trip min/avg/max = a/b/c ms`) or iputils'
    /// (`rtt min/avg/max/mdev = a/b/c/d ms`) ping summary, in milliseconds.
    public static func pingAverageMilliseconds(_ text: String) -> Double? {
        guard let line = text.split(separator: "\n").last(where: { $0.contains("min/avg/max") }),
              let eq = line.range(of: "= ") else { return nil }
        let fields = line[eq.upperBound...].split(separator: "/")
        guard fields.count >= 3, let avg = Double(fields[1]), avg.isFinite, avg >= 0 else { return nil }
        return avg
    }

    /// iperf3 `-J`: bits per second at the receiver.
    public static func iperfBitsPerSecond(_ text: String) -> Double? {
        guard let start = text.firstIndex(of: "{"), let end = text.lastIndex(of: "}"), start < end,
              let obj = try? JSONSerialization.jsonObject(with: Data(text[start...end].utf8)) as? [String: Any],
              let endObj = obj["end"] as? [String: Any] else { return nil }
        for key in ["sum_received", "sum"] {
            if let s = endObj[key] as? [String: Any], let bps = (s["bits_per_second"] as? NSNumber)?.doubleValue, bps.isFinite, bps > 0 { return bps }
        }
        return nil
    }

    /// `key=value` pairs a bench script prints (the last occurrence of each key wins).
    public static func keyValues(_ text: String) -> [String: String] {
        var out: [String: String] = [:]
        for line in text.split(separator: "\n") {
            for token in line.split(separator: " ") {
                let kv = token.split(separator: "=", maxSplits: 1)
                if kv.count == 2, kv[0].allSatisfy({ $0.isLetter || $0.isNumber || $0 == "_" || $0 == "-" }) {
                    out[String(kv[0])] = String(kv[1])
                }
            }
        }
        return out
    }

    static func number(after label: String, in text: String) -> Double? {
        guard let r = text.range(of: label) else { return nil }
        let rest = text[r.upperBound...].drop { $0 == " " || $0 == "\t" }
        return Double(rest.prefix { $0.isNumber || $0 == "." }).flatMap { $0.isFinite ? $0 : nil }
    }
}
