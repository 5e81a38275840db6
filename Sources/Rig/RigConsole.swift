import Foundation

/// Reads the rig's markers from its serial console: where the command starts (and the guest's
/// uptime then), its exit status, or the rig's own error. The command's output does not pass
/// here (the host follows it in the scratch share); boot lines are kept for error messages.
/// Console bytes come from a guest: lines are capped and markers parsed without trusting them.
public struct RigConsole: Sendable {
    public enum Phase: Sendable, Equatable { case booting, running, exited(Int32), failed(String) }

    public static let startMarker = "@@mvm:rig-start"
    public static let exitMarker = "@@mvm:rig-exit status="
    public static let errorMarker = "@@mvm:rig-error "
    public static let heartbeatMarker = "@@mvm:rig-alive "
    /// What the rig kernel prints when its CPUs stop making progress (a soft lockup, an RCU
    /// stall, a task blocked for minutes): printed again and again while it stays stuck, so
    /// such lines are no sign of life.
    static let lockupReports = ["soft lockup", "detected stalls", "self-detected stall", "blocked for more than"]
    /// A longer line is dropped in pieces, so a guest printing without newlines cannot grow memory.
    static let maxLine = 64 * 1024

    public private(set) var phase: Phase = .booting
    public private(set) var guestStartUptime: Double?
    /// The last console lines before the start marker, for error messages.
    public private(set) var bootTail: [String] = []
    /// The last console lines after it that are no marker: the kernel's panic and alert lines
    /// (the rig boots with loglevel=2), for the error when the rig dies mid-command.
    public private(set) var runTail: [String] = []
    /// Lines read so far that say the kernel is alive: every complete line but a lockup report.
    public private(set) var linesOfLife = 0
    /// The last lockup reports the kernel printed while the command ran (at most 4).
    public private(set) var lockups: [String] = []
    private var line: [UInt8] = []

    public init() {}

    public var isFinished: Bool {
        switch phase { case .exited, .failed: return true; default: return false }
    }

    /// Feeds console bytes.
    public mutating func feed(_ bytes: some Sequence<UInt8>) {
        for b in bytes {
            if isFinished { break }
            if b == UInt8(ascii: "\n") {
                if line.last == UInt8(ascii: "\r") { line.removeLast() }
                finishLine()
                line.removeAll(keepingCapacity: true)
            } else {
                line.append(b)
                if line.count >= Self.maxLine { line.removeAll(keepingCapacity: true) }
            }
        }
    }

    private mutating func finishLine() {
        let text = String(decoding: line, as: UTF8.self)
        if Self.lockupReports.contains(where: text.contains) {
            if phase == .running { lockups = Array((lockups + [String(text.prefix(200))]).suffix(4)) }
        } else {
            linesOfLife += 1
        }
        switch phase {
        case .booting:
            if let r = text.range(of: Self.startMarker) {
                phase = .running
                let rest = text[r.upperBound...]
                if let eq = rest.range(of: "uptime="), let end = rest[eq.upperBound...].range(of: "@@") {
                    guestStartUptime = Double(rest[eq.upperBound..<end.lowerBound])
                }
            } else if let r = text.range(of: Self.errorMarker) {
                phase = .failed(String(text[r.upperBound...]).replacingOccurrences(of: "@@", with: ""))
            } else if !text.isEmpty {
                bootTail.append(String(text.prefix(300)))
                if bootTail.count > 20 { bootTail.removeFirst() }
            }
        case .running:
            guard text.hasPrefix(Self.exitMarker) else {
                if !text.isEmpty, !text.hasPrefix(Self.heartbeatMarker) {
                    runTail.append(String(text.prefix(300)))
                    if runTail.count > 100 { runTail.removeFirst() }
                }
                return
            }
            let digits = text.dropFirst(Self.exitMarker.count).prefix { $0.isNumber }
            if let s = Int32(digits), text.dropFirst(Self.exitMarker.count + digits.count).hasPrefix("@@") {
                phase = .exited(s)
            } else {
                phase = .failed("malformed exit line '\(text.prefix(100))'")
            }
        case .exited, .failed:
            break
        }
    }
}
