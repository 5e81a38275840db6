import Foundation
import MicroVMCore
import Host
#if canImport(Glibc)
import Glibc
#endif

/// A rig cut off before its command ended: the command's own outcome is unknown; what it wrote
/// until then is `output`.
public protocol RigCutOff: Error, CustomStringConvertible, Sendable {
    var output: Data { get }
}

extension RigCutOff {
    public var outputText: String { String(decoding: output, as: UTF8.self) }
}

/// A rig lost before its command ended: its kernel stalled (`RigStall`) or died (`RigEnded`).
/// Another rig may well run the same command through.
public protocol RigLost: RigCutOff {}

/// The command was still running when the rig's `--timeout` ran out, so the rig was killed.
/// The rig itself was alive: the command, or the machine, was too slow for the limit.
public struct RigTimedOut: RigCutOff {
    public var timeout: Double
    public var output: Data

    public var description: String {
        "the rig ran past --timeout \(Int(timeout)) s while the command ran and was killed; raise --timeout if the command needs longer"
    }
}

/// The rig's QEMU ended while the command ran, without the command's status: its kernel
/// panicked or reset (the rig runs with -no-reboot and panic=-1). The console's last lines
/// (the kernel prints its panic and alert lines there) say why, where it said anything.
public struct RigEnded: RigLost {
    public var console: [String]
    public var qemuStderr: String
    public var output: Data

    public var description: String {
        var s = "the rig ended without reporting the command's exit status: its kernel crashed or reset, or ran out of memory (try more --memory)"
        // A panic prints a whole trace: its headline lines, then how it ends.
        let key = ["Kernel panic", "BUG:", "Oops", "general protection", "RIP:", "Call Trace", "watchdog:", "Out of memory"]
        let headlines = console.filter { line in key.contains { line.contains($0) } }.prefix(6)
        if !headlines.isEmpty { s += "; its kernel said: " + headlines.joined(separator: " | ") }
        if !console.isEmpty { s += "; its console's last lines: " + console.suffix(4).joined(separator: " | ") }
        if !qemuStderr.isEmpty { s += "; QEMU: " + qemuStderr.suffix(600) }
        return s
    }
}

/// The rig stopped making progress: no heartbeat, console line (lockup reports aside) or output for `silentSeconds`
/// while the command ran. Under TCG, an L1 kernel running nested guests on an emulated AMD-V
/// CPU has been seen to stop like this for good (its own timeouts never fire), so the rig is
/// killed instead of waited out. Carries what the command wrote before, and QEMU's view then.
public struct RigStall: RigLost {
    /// Seconds without any sign of life when the rig was killed.
    public var silentSeconds: Double
    /// Set when the kernel still gave signs of life but the command had written nothing for
    /// this many seconds (`RigOptions.outputTimeout`).
    public var outputSilentSeconds: Double? = nil
    /// QEMU's CPU use over that silence, in percent of one CPU (nil if it could not be read).
    public var qemuCPUPercent: Double?
    /// The rig kernel's uptime at its last heartbeat.
    public var lastHeartbeat: String?
    /// Each vCPU's instruction pointer and state as QEMU's monitor gave them at the stall.
    public var vcpus: [String]
    /// The rig kernel's last reports of its own lockup (soft lockups, RCU stalls), if any.
    public var lockups: [String] = []
    /// The command's output up to the stall.
    public var output: Data

    public var description: String {
        if let quiet = outputSilentSeconds {
            var s = "the rig's command was stuck: no output for \(Int(quiet)) s (the --output-timeout) while the rig's kernel still gave signs of life"
            if let lastHeartbeat { s += " (last heartbeat at uptime \(lastHeartbeat) s)" }
            if !vcpus.isEmpty { s += "; vCPUs: " + vcpus.joined(separator: " | ") }
            return s + ". It was killed. A process stuck in the kernel (a 9p write, say) outlives its own time limits: run the command again, or raise --output-timeout if it can be quiet for longer"
        }
        var s = "the rig stalled: no heartbeat, console line other than a lockup report, or output from its kernel for \(Int(silentSeconds)) s while the command ran"
        if let lastHeartbeat { s += " (last heartbeat at uptime \(lastHeartbeat) s)" }
        if let p = qemuCPUPercent {
            s += String(format: "; QEMU used %.0f%% of a CPU meanwhile (%@)", p, p >= 50 ? "spinning" : "mostly idle")
        }
        if !lockups.isEmpty { s += "; its kernel reported: " + lockups.joined(separator: " | ") }
        if !vcpus.isEmpty { s += "; vCPUs: " + vcpus.joined(separator: " | ") }
        return s + ". It was killed. Nested SVM under TCG has been seen to lock up so: run the command again, or raise --stall-timeout if it can be silent for longer"
    }
}

/// Watches a running rig for signs of life and says when it has been silent too long.
struct RigWatchdog {
    /// Seconds of silence that count as a stall; 0 or less turns the watchdog off.
    let limit: Double
    /// Seconds without new output from the command that count as stuck, heartbeat or not;
    /// 0 or less: the command may be quiet for as long as it likes.
    var outputLimit: Double = 0
    let pid: pid_t
    private(set) var lastSign: Date
    private(set) var lastOutput: Date
    private(set) var lastHeartbeat: String?
    /// The longest silence seen so far, in seconds (for the record of a run that did not stall).
    private(set) var longestSilence: Double = 0
    private var cpuSample: (at: Date, seconds: Double)?

    init(limit: Double, outputLimit: Double = 0, pid: pid_t, now: Date = Date()) {
        self.limit = limit; self.outputLimit = outputLimit; self.pid = pid; lastSign = now; lastOutput = now
    }

    private var running = false

    /// The command has started: silences count from here (the boot before is quiet by design).
    mutating func start(now: Date = Date()) {
        running = true
        lastSign = now
        lastOutput = now
    }

    /// The command wrote something: a sign of life, and of progress.
    mutating func output(now: Date = Date()) {
        lastOutput = now
        sign(now: now)
    }

    /// Records a sign of life (console bytes, new output, a new heartbeat).
    mutating func sign(now: Date = Date()) {
        if running { longestSilence = max(longestSilence, now.timeIntervalSince(lastSign)) }
        lastSign = now
        // QEMU's CPU time at the last sign, at most once a second: the baseline for a stall's CPU figure.
        if cpuSample.map({ now.timeIntervalSince($0.at) >= 1 }) ?? true, let cpu = ProcessIdentity.cpuSeconds(pid: pid) {
            cpuSample = (now, cpu)
        }
    }

    /// Takes the heartbeat file's content; a new value is a sign of life.
    mutating func heartbeat(_ text: String?, now: Date = Date()) {
        guard let beat = text?.trimmingCharacters(in: .whitespacesAndNewlines), !beat.isEmpty, beat != lastHeartbeat else { return }
        lastHeartbeat = beat
        sign(now: now)
    }

    func isStalled(now: Date = Date()) -> Bool {
        (limit > 0 && now.timeIntervalSince(lastSign) >= limit) || isStuck(now: now)
    }

    /// The kernel still beats but the command has written nothing for `outputLimit`: a process
    /// stuck where it cannot be killed (a 9p write, say), which its own time limits cannot end.
    func isStuck(now: Date = Date()) -> Bool {
        running && outputLimit > 0 && now.timeIntervalSince(lastOutput) >= outputLimit
    }

    /// QEMU's CPU use since the last sign, in percent of one CPU.
    func cpuPercentSinceLastSign(now: Date = Date()) -> Double? {
        guard let s = cpuSample, let cpu = ProcessIdentity.cpuSeconds(pid: pid) else { return nil }
        let wall = now.timeIntervalSince(s.at)
        return wall > 0 ? max(0, cpu - s.seconds) / wall * 100 : nil
    }

}

/// A minimal QMP client for the rig's diagnostics: one human-monitor command over QEMU's
/// unix socket, bounded in time, never throwing (a stalled QEMU must not stall the caller).
enum RigMonitor {
    /// Runs an HMP command through QMP and returns its text, or nil.
    static func human(_ command: String, socket path: String, timeout: Double = 3) -> String? {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { return nil }
        withUnsafeMutableBytes(of: &addr.sun_path) { dst in for (i, b) in bytes.enumerated() { dst[i] = b } }
        let ok = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0 }
        }
        guard ok else { return nil }
        let deadline = Date().addingTimeInterval(timeout)
        var pending = Data()
        // Reads one JSON object per line until one satisfies `want`.
        func next(_ want: ([String: Any]) -> Bool) -> [String: Any]? {
            var buf = [UInt8](repeating: 0, count: 16384)
            while true {
                while let nl = pending.firstIndex(of: UInt8(ascii: "\n")) {
                    let line = pending[pending.startIndex..<nl]
                    pending.removeSubrange(pending.startIndex...nl)
                    if let o = try? JSONSerialization.jsonObject(with: line) as? [String: Any], want(o) { return o }
                }
                let left = deadline.timeIntervalSinceNow
                guard left > 0, pending.count < 1 << 20 else { return nil }
                var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                guard poll(&p, 1, Int32(left * 1000) + 1) > 0 else { return nil }
                let n = read(fd, &buf, buf.count)
                guard n > 0 else { return nil }
                pending.append(contentsOf: buf[0..<n])
            }
        }
        func send(_ object: [String: Any]) -> Bool {
            guard var d = try? JSONSerialization.data(withJSONObject: object) else { return false }
            d.append(UInt8(ascii: "\n"))
            return d.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) } == d.count
        }
        guard next({ $0["QMP"] != nil }) != nil, send(["execute": "qmp_capabilities"]),
              next({ $0["return"] != nil || $0["error"] != nil }) != nil,
              send(["execute": "human-monitor-command", "arguments": ["command-line": command]]),
              let reply = next({ $0["return"] != nil || $0["error"] != nil }) else { return nil }
        return reply["return"] as? String
    }

    /// One line per vCPU from `info registers -a`: its number, RIP, privilege level, halt state
    /// and EFER (whose SVME bit says nested SVM is on).
    static func vcpuSummary(_ registers: String) -> [String] {
        var out: [String] = []
        var current: [String] = []
        func flush() { if !current.isEmpty { out.append(current.joined(separator: " ")); current = [] } }
        // QEMU ends these lines with CRLF, one Character in Swift: split on any newline.
        for line in registers.split(whereSeparator: \.isNewline) {
            let text = line.trimmingCharacters(in: .whitespaces)
            if text.hasPrefix("CPU#") { flush(); current.append(text) }
            for field in text.split(separator: " ") where
                field.hasPrefix("RIP=") || field.hasPrefix("EIP=") || field.hasPrefix("CPL=") || field.hasPrefix("HLT=") || field.hasPrefix("EFER=") {
                current.append(String(field))
            }
        }
        flush()
        return out
    }
}
