import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// The protocol between the guest init (images/init) and every backend.
///
/// The init writes these lines to the console (each may be preceded by a `\r` or kernel noise):
/// ```
/// @@mvm:boot-complete uptime=1.23@@
/// @@mvm:d <base64 of up to 57 bytes of the command's combined output>
/// @@mvm:end status=0 bytes=42@@
/// ```
/// and, for the direct VMM, writes `GuestProtocol.bootTimerValue` to I/O port
/// `GuestProtocol.bootTimerPort` at boot complete (via /dev/port), which the VMM timestamps.
/// Data lines carry their own prefix so kernel messages interleaved with them do no harm.
public enum GuestProtocol {
    public static let bootCompleteMarker = "@@mvm:boot-complete"
    public static let dataPrefix = "@@mvm:d "
    public static let endMarker = "@@mvm:end"
    public static let bootTimerPort: UInt16 = 0x440
    public static let bootTimerValue: UInt8 = 123
    /// Kernel command-line key that carries the base64 of the command (NUL-separated argv).
    public static let commandParameter = "mvm.cmd"
    /// Kernel command-line key that asks the init to start the guest agent (images/agent) on this
    /// vsock port while the command runs (the host connects to the VM's CID and this port).
    /// Only set when the spec asks for it (`VMSpec.vsockShell`): the agent has no credentials.
    public static let vsockParameter = "mvm.vsock"
    /// Set to 1 when the host runs the command through the guest agent (`VMSpec.agentRunsCommand`):
    /// the init waits for the status the agent hands it, then frames it and powers off.
    public static let agentRunsCommandParameter = "mvm.await"
    /// Set to 1 when the rootfs disk is the shared image, attached read-only: the init mounts it so.
    public static let readOnlyRootParameter = "mvm.ro"
    /// Set to 1 when vCPUs may be added while the guest runs (`--max-cpus`): the init brings
    /// every CPU the hypervisor plugs in online (Linux leaves that to user space).
    public static let cpuHotplugParameter = "mvm.cpuhp"
    /// Base64 of the command's environment (NAME=VALUE entries joined by NUL): the command gets
    /// exactly these instead of the init's.
    public static let environmentParameter = "mvm.env"
    /// Base64 of the directory the command starts in (needs /bin/sh on the root disk).
    public static let workingDirectoryParameter = "mvm.cwd"
    public static let vsockShellPort: UInt32 = 1024

    /// Encodes argv for the kernel command line: base64 of the arguments joined by NUL,
    /// so spaces and quotes survive the kernel's parser.
    public static func encodeCommand(_ argv: [String]) -> String {
        Data(argv.joined(separator: "\u{0}").utf8).base64EncodedString()
    }

    public static func decodeCommand(_ text: String) -> [String]? {
        guard let d = Data(base64Encoded: text), let s = String(data: d, encoding: .utf8) else { return nil }
        return s.split(separator: "\u{0}", omittingEmptySubsequences: false).map(String.init)
    }

    /// Produces the framed lines for an output and status (the Swift twin of the init's shell).
    public static func frame(output: Data, status: Int32) -> String {
        var lines: [String] = []
        var i = 0
        while i < output.count {
            let chunk = output[output.index(output.startIndex, offsetBy: i)..<output.index(output.startIndex, offsetBy: min(i + 57, output.count))]
            lines.append(dataPrefix + Data(chunk).base64EncodedString())
            i += 57
        }
        lines.append("\(endMarker) status=\(status) bytes=\(output.count)@@")
        return lines.joined(separator: "\n") + "\n"
    }
}

extension VMSpec {
    /// What the guest init reads besides the command, for every VM backend: eth0's address and
    /// the host end as its gateway (`mvm.ip`, `mvm.gw`; the init exports the latter as
    /// `$MVM_HOST`), and the guest agent's port (`mvm.vsock`) when the spec asks for it.
    public var initParameters: [String] {
        var p: [String] = []
        if let g = net?.guestAddress {
            p.append("mvm.ip=\(HostLinks.withLength(g))")
            if let h = net?.hostAddress { p.append("mvm.gw=\(HostLinks.address(h))") }
        }
        if vsockCID != nil, vsockShell {
            p.append("\(GuestProtocol.vsockParameter)=\(GuestProtocol.vsockShellPort)")
            if agentRunsCommand == true { p.append("\(GuestProtocol.agentRunsCommandParameter)=1") }
        }
        if let maxCPUs, maxCPUs > cpus { p.append("\(GuestProtocol.cpuHotplugParameter)=1") }
        if let environment { p.append("\(GuestProtocol.environmentParameter)=\(GuestProtocol.encodeCommand(environment))") }
        if let dir = workingDirectory, dir != "/" {
            p.append("\(GuestProtocol.workingDirectoryParameter)=\(GuestProtocol.encodeCommand([dir]))")
        }
        return p
    }
}

/// The result the guest init reported.
public struct GuestReport: Sendable, Equatable {
    public var status: Int32
    public var output: Data
    public var bootUptime: Double?
    public var outputText: String { String(decoding: output, as: UTF8.self) }
}

/// Reads a console stream incrementally and finds the init's boot signal and framed result.
public struct ConsoleParser: Sendable {
    public private(set) var bootComplete = false
    public private(set) var bootUptime: Double?
    public private(set) var report: GuestReport?
    private var pending = ""
    private var data = Data()

    public init() {}

    /// Feeds console bytes; returns true when something new was recognised.
    @discardableResult
    public mutating func feed(_ bytes: some Sequence<UInt8>) -> Bool {
        // A tty console ends lines with "\r\n", which Swift treats as one Character that
        // firstIndex(of: "\n") never matches; CRs carry no meaning here, so drop them up front.
        pending += String(decoding: bytes.filter { $0 != 13 }, as: UTF8.self)
        var changed = false
        while let nl = pending.firstIndex(of: "\n") {
            let line = String(pending[..<nl])
            pending = String(pending[pending.index(after: nl)...])
            if consume(line: line) { changed = true }
        }
        // A protocol line is short: a guest that never ends its line cannot grow this buffer.
        if pending.utf8.count > Self.longestLine { pending = String(pending.suffix(Self.longestLine / 2)) }
        return changed
    }

    public mutating func feed(_ text: String) -> Bool { feed(Array(text.utf8)) }

    /// Parses a whole console transcript.
    public static func parse(_ console: String) -> ConsoleParser {
        var p = ConsoleParser()
        _ = p.feed(console + "\n")
        return p
    }

    /// Console lines longer than this are not the protocol's and are cut from the front.
    static let longestLine = 64 << 10
    /// The command's output kept in memory: past the limit, the newest half of it.
    static let outputLimit = 64 << 20

    private mutating func consume(line raw: String) -> Bool {
        let line = raw.replacing("\r", with: "")
        if let r = line.firstRange(of: GuestProtocol.bootCompleteMarker) {
            bootComplete = true
            let rest = line[r.upperBound...]
            if let u = rest.firstRange(of: "uptime=") {
                bootUptime = Double(rest[u.upperBound...].prefix { $0.isNumber || $0 == "." })
            }
            return true
        }
        if let r = line.firstRange(of: GuestProtocol.dataPrefix) {
            let payload = line[r.upperBound...].trimmed()
            if let d = Data(base64Encoded: payload) {
                data.append(d)
                if data.count > Self.outputLimit { data.removeFirst(data.count - Self.outputLimit / 2) }
            }
            return false
        }
        if let r = line.firstRange(of: GuestProtocol.endMarker) {
            let rest = String(line[r.upperBound...])
            guard let status = Self.field("status", in: rest).flatMap({ Int32($0) }) else { return false }
            let bytes = Self.field("bytes", in: rest).flatMap { Int($0) }
            var out = data
            if let bytes, bytes < out.count { out = out.prefix(bytes) }
            report = GuestReport(status: status, output: out, bootUptime: bootUptime)
            return true
        }
        return false
    }

    private static func field(_ name: String, in text: String) -> String? {
        guard let r = text.firstRange(of: name + "=") else { return nil }
        return String(text[r.upperBound...].prefix { $0.isNumber || $0 == "-" })
    }
}
