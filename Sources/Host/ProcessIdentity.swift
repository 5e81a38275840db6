import Foundation
import MicroVMCore

/// Tells a live process from a dead one whose pid was reused: a pid plus its start time
/// (field 22 of /proc/PID/stat, in clock ticks since boot) names one process for the whole boot.
public enum ProcessIdentity {
    /// /proc/PID/stat's fields from field 3 (the state) on, or nil when no such process exists.
    /// The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    public static func statFields(pid: Int32, procRoot: String = "/proc") -> [Substring]? {
        guard pid > 0, let stat = readWholeText("\(procRoot)/\(pid)/stat") else { return nil }
        return statFields(stat)
    }

    public static func statFields(_ stat: String) -> [Substring]? { parseStat(stat)?.fields }

    /// The command name (field 2, between the first '(' and the last ')') and the fields after it.
    public static func parseStat(_ stat: String) -> (comm: Substring, fields: [Substring])? {
        guard let open = stat.firstIndex(of: "("), let close = stat.lastIndex(of: ")"), open < close else { return nil }
        return (stat[stat.index(after: open)..<close], stat[stat.index(after: close)...].split(separator: " "))
    }

    /// The start time of `pid`, or nil when no such process exists (field 22: index 19 from field 3).
    public static func startTime(pid: Int32, procRoot: String = "/proc") -> UInt64? {
        guard let f = statFields(pid: pid, procRoot: procRoot), f.count > 19 else { return nil }
        return UInt64(f[19])
    }

    /// User plus system CPU seconds of `pid` (fields 14 and 15: indices 11 and 12 from field 3).
    public static func cpuSeconds(pid: Int32, procRoot: String = "/proc") -> Double? {
        statFields(pid: pid, procRoot: procRoot).flatMap(cpuSeconds(fields:))
    }

    public static func cpuSeconds(fields f: [Substring]) -> Double? {
        guard f.count > 12, let u = Double(f[11]), let s = Double(f[12]) else { return nil }
        return (u + s) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    /// Whether the process that took a grant still runs: the pid exists and, when the start time
    /// was recorded, it is the same process. A zombie counts as gone.
    public static func isAlive(pid: Int32, startTime: UInt64?, procRoot: String = "/proc") -> Bool {
        guard let f = statFields(pid: pid, procRoot: procRoot), f.count > 19, let now = UInt64(f[19]), f.first != "Z" else { return false }
        return startTime.map { $0 == now } ?? true
    }
}
