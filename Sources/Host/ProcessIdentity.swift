import Foundation

/// Tells a live process from a dead one whose pid was reused: a pid plus its start time
/// (field 22 of /proc/PID/stat, in clock ticks since boot) names one process for the whole boot.
public enum ProcessIdentity {
    /// The start time of `pid`, or nil when no such process exists.
    public static func startTime(pid: Int32, procRoot: String = "/proc") -> UInt64? {
        guard pid > 0, let stat = try? String(contentsOfFile: "\(procRoot)/\(pid)/stat", encoding: .utf8) else { return nil }
        // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
        guard let close = stat.lastIndex(of: ")") else { return nil }
        let rest = stat[stat.index(after: close)...].split(separator: " ")
        // rest[0] is field 3 (state), so field 22 is rest[19].
        guard rest.count > 19 else { return nil }
        return UInt64(rest[19])
    }

    /// Whether the process that took a grant still runs: the pid exists and, when the start time
    /// was recorded, it is the same process. A zombie counts as gone.
    public static func isAlive(pid: Int32, startTime: UInt64?, procRoot: String = "/proc") -> Bool {
        guard let now = self.startTime(pid: pid, procRoot: procRoot) else { return false }
        if let state = try? String(contentsOfFile: "\(procRoot)/\(pid)/stat", encoding: .utf8),
           let close = state.lastIndex(of: ")"), state[state.index(after: close)...].split(separator: " ").first == "Z" {
            return false
        }
        return startTime.map { $0 == now } ?? true
    }
}
