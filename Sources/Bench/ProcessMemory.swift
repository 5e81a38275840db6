import Foundation
import MicroVMCore
import Host

/// Host memory an instance costs, read from /proc: the proportional set size (PSS) of the
/// processes that carry it (the VMM or runtime and everything under them). PSS splits shared
/// pages between their users, so k instances sum to what they really cost the host.
public enum ProcessMemory {
    public struct Entry: Sendable { public var pid: Int32; public var ppid: Int32; public var comm: String; public var cmdline: String }

    public static func table(proc: String = "/proc") -> [Int32: Entry] {
        var out: [Int32: Entry] = [:]
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: proc) else { return out }
        for n in names {
            guard let pid = Int32(n) else { continue }
            guard let stat = readWholeText("\(proc)/\(n)/stat"),
                  let (comm, rest) = ProcessIdentity.parseStat(stat), rest.count > 1, let ppid = Int32(rest[1]) else { continue }
            let raw = readWholeFile("\(proc)/\(n)/cmdline") ?? []
            let cmdline = String(decoding: raw.map { $0 == 0 ? 0x20 : $0 }, as: UTF8.self)
            out[pid] = Entry(pid: pid, ppid: ppid, comm: String(comm), cmdline: cmdline)
        }
        return out
    }

    /// The processes of an instance: those given, those whose command line names it, and all their descendants.
    public static func instanceProcesses(name: String, pids: [Int32], table: [Int32: Entry]) -> [Entry] {
        var roots = Set(pids)
        for e in table.values where e.cmdline.contains(name) { roots.insert(e.pid) }
        return tree(of: roots, table: table)
    }

    /// The given processes and all their descendants.
    public static func tree(of roots: some Sequence<Int32>, table: [Int32: Entry]) -> [Entry] {
        var children: [Int32: [Int32]] = [:]
        for e in table.values { children[e.ppid, default: []].append(e.pid) }
        var seen = Set<Int32>(), stack = Array(roots)
        while let p = stack.popLast() {
            guard seen.insert(p).inserted else { continue }
            stack.append(contentsOf: children[p] ?? [])
        }
        return seen.compactMap { table[$0] }.sorted { $0.pid < $1.pid }
    }

    /// The summed PSS of processes, in bytes (one that is gone counts 0).
    public static func pss(of processes: [Entry]) -> UInt64 {
        processes.reduce(0) { $0 + (pss(pid: $1.pid) ?? 0) }
    }

    /// PSS in bytes from /proc/PID/smaps_rollup (nil when the process is gone or unreadable).
    public static func pss(pid: Int32, proc: String = "/proc") -> UInt64? {
        guard let text = readWholeText("\(proc)/\(pid)/smaps_rollup") else { return nil }
        return parsePss(text)
    }

    public static func parsePss(_ smapsRollup: String) -> UInt64? {
        for line in smapsRollup.split(separator: "\n") where line.hasPrefix("Pss:") {
            let f = line.split(separator: " ")
            if f.count >= 2, let kb = UInt64(f[1]) { return kb * 1024 }
        }
        return nil
    }

    public static func memAvailable(proc: String = "/proc") -> UInt64? {
        guard let text = readWholeText("\(proc)/meminfo") else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("MemAvailable:") {
            let f = line.split(separator: " ")
            if f.count >= 2, let kb = UInt64(f[1]) { return kb * 1024 }
        }
        return nil
    }
}
