import CVhost
import Foundation
import MicroVMCore

/// The host's side of the guest agent (images/agent/mvm-agent.c), which the guest init serves
/// on the VM's vsock port `GuestProtocol.vsockShellPort` when started with `--vsock CID
/// --vsock-shell`, reached over the host's vhost-vsock the same way in every VM mode: how
/// `mvm exec` and `mvm-runtime exec` run a process in a VM.
///
/// Both ways every message is a frame: a type byte, a 4-byte big-endian length, the payload.
/// The host sends the request (`A` arguments, `E` environment, `W` directory, `U` user, `M` the
/// VM's own process, `T` a terminal, `Z` its size, `R` a resource limit, then `X`), then the process's stdin (`I`, `C`
/// to close it), signals (`K`) and the terminal's new sizes (`Z`); the agent sends its
/// stdout (`O`) and stderr (`D`), and last its status (`S`, after `F` when it could not run it).
///
/// ```swift
/// let r = try await GuestAgent.exec(cid: 42, command: ["uname", "-r"])
/// print(r.status, r.output)
/// ```
public enum GuestAgent {
    /// What to run: argv, and optionally exactly this environment, a directory and a user.
    public struct Request: Sendable, Equatable, Codable {
        public struct User: Sendable, Equatable, Codable {
            public var uid: UInt32
            public var gid: UInt32
            public init(uid: UInt32, gid: UInt32) { self.uid = uid; self.gid = gid }
        }
        public var arguments: [String]
        public var environment: [String]?
        public var workingDirectory: String?
        public var user: User?
        /// The VM's own process (`VMSpec.agentRunsCommand`): the guest init ends the VM with its status.
        public var main: Bool?
        /// A terminal in the guest for the process (its stdout and stderr are one stream then).
        public var terminal: Bool?
        /// The terminal's size, when the host side has one.
        public var size: WindowSize?
        /// Resource limits (setrlimit) the process starts with.
        public var limits: [Limit]?

        public struct Limit: Sendable, Equatable, Codable {
            public var resource: Int32
            public var soft: UInt64
            public var hard: UInt64
            public init(resource: Int32, soft: UInt64, hard: UInt64) { self.resource = resource; self.soft = soft; self.hard = hard }
        }

        public struct WindowSize: Sendable, Equatable, Codable {
            public var rows: UInt16
            public var columns: UInt16
            public init(rows: UInt16, columns: UInt16) { self.rows = rows; self.columns = columns }
            var frame: [UInt8] { GuestAgent.frame("Z", Array("\(rows) \(columns)".utf8)) }
        }

        public init(arguments: [String], environment: [String]? = nil, workingDirectory: String? = nil, user: User? = nil, main: Bool? = nil,
                    terminal: Bool? = nil, size: WindowSize? = nil) {
            self.arguments = arguments
            self.environment = environment
            self.workingDirectory = workingDirectory
            self.user = user
            self.main = main
            self.terminal = terminal
            self.size = size
        }

        /// The request's frames, `X` last.
        var frames: [UInt8] {
            var out: [UInt8] = []
            for a in arguments { out += GuestAgent.frame("A", Array(a.utf8)) }
            for e in environment ?? [] { out += GuestAgent.frame("E", Array(e.utf8)) }
            if let workingDirectory { out += GuestAgent.frame("W", Array(workingDirectory.utf8)) }
            if let user { out += GuestAgent.frame("U", Array("\(user.uid):\(user.gid)".utf8)) }
            if main == true { out += GuestAgent.frame("M", []) }
            if terminal == true { out += GuestAgent.frame("T", []) + (size?.frame ?? []) }
            for l in limits ?? [] { out += GuestAgent.frame("R", Array("\(l.resource) \(l.soft) \(l.hard)".utf8)) }
            return out + GuestAgent.frame("X", [])
        }
    }

    /// The largest frame either side sends; a longer one from the guest ends the exchange.
    static let maxFrame = 1 << 20
    /// The most stdin bytes one frame carries (what the agent keeps pending at most).
    static let stdinChunk = 64 << 10

    static func frame(_ type: Character, _ payload: [UInt8]) -> [UInt8] {
        let n = UInt32(payload.count)
        return [type.asciiValue!, UInt8(n >> 24), UInt8(truncatingIfNeeded: n >> 16), UInt8(truncatingIfNeeded: n >> 8), UInt8(truncatingIfNeeded: n)] + payload
    }

    /// Runs `command` in the guest: its combined output (at most 64 MiB kept) and its exit status.
    public static func exec(cid: UInt32, command: [String], timeout: Int = 3600) async throws -> (status: Int32, output: String) {
        try await Task.detached {
            let fd = try connect(cid: cid, port: GuestProtocol.vsockShellPort)
            defer { close(fd) }
            return try collect(fd, Request(arguments: command), timeout: timeout)
        }.value
    }

    /// One exchange on a connected agent socket, the process's stdin closed at once: its
    /// stdout and stderr interleaved as they came, and its status.
    public static func collect(_ fd: Int32, _ request: Request, timeout: Int) throws -> (status: Int32, output: String) {
        var output: [UInt8] = []
        let status = try relay(fd, request, input: nil, timeout: timeout) { _, bytes in
            if output.count < 64 << 20 { output += bytes.prefix((64 << 20) - output.count) }
        }
        return (status, String(decoding: output, as: UTF8.self))
    }

    /// One exchange on a connected agent socket: sends the request, copies `input` (a file
    /// descriptor, read to its end; nil closes the process's stdin at once) to the process, hands
    /// every piece of its stdout (`1`) and stderr (`2`) to `output` as it comes, and sends the
    /// agent each signal read from `signals` (`signalDescriptor`'s) that `forward` lets through
    /// (it may throw to give up on the process).
    /// With a terminal on `input`, a change of its size (looked at on SIGWINCH and twice a second,
    /// since a relay need not be the terminal's controlling process) goes to the guest's terminal.
    /// Returns the process's status (128 + N when a signal N ended it). Throws when the guest
    /// breaks the protocol, goes away before the status, or `timeout` seconds (nil: no limit)
    /// pass without a frame.
    public static func relay(_ fd: Int32, _ request: Request, input: Int32?, signals: Int32? = nil, timeout: Int?,
                             forward: (Int32) throws -> Bool = { _ in true }, output: (Int32, [UInt8]) throws -> Void) throws -> Int32 {
        guard !request.arguments.isEmpty else { throw MicroVMError.invalidArgument("no command given to run in the guest") }
        try send(fd, request.frames + (input == nil ? frame("C", []) : []))
        var reader = FrameReader()
        var inputOpen = input != nil
        var buf = [UInt8](repeating: 0, count: 65536)
        let terminal = request.terminal == true ? input.flatMap { isatty($0) != 0 ? $0 : nil } : nil
        var size = request.size
        // A terminal's resize is its new size for the guest's terminal, not a signal.
        func resized() throws {
            guard let terminal, let now = Console.size(of: terminal), now != size else { return }
            size = now
            try send(fd, now.frame)
        }
        var heard = Monotonic.seconds()
        while true {
            var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0)]
            if inputOpen, let input { fds.append(pollfd(fd: input, events: Int16(POLLIN), revents: 0)) }
            if let signals { fds.append(pollfd(fd: signals, events: Int16(POLLIN), revents: 0)) }
            let wait = terminal != nil ? 500 : timeout.map { Int32(min($0, Int(Int32.max / 1000)) * 1000) } ?? -1
            let ready = poll(&fds, nfds_t(fds.count), wait)
            if ready < 0, errno == EINTR { continue }
            try resized()
            guard ready > 0 else {
                if let timeout, Monotonic.seconds() - heard >= Double(timeout) {
                    throw MicroVMError(.timeout, "the guest agent sent nothing for \(timeout) s")
                }
                continue
            }
            for p in fds.dropFirst() where p.revents != 0 {
                if p.fd == signals {
                    var number: UInt8 = 0
                    guard read(p.fd, &number, 1) == 1, try forward(Int32(number)) else { continue }
                    if Int32(number) == SIGWINCH, request.terminal == true {
                        try resized()
                    } else {
                        try send(fd, frame("K", [number]))
                    }
                } else {
                    let n = buf.withUnsafeMutableBytes { read(p.fd, $0.baseAddress, stdinChunk) }
                    if n > 0 {
                        try send(fd, frame("I", Array(buf[0..<n])))
                    } else if n == 0 || (errno != EINTR && errno != EAGAIN) {
                        inputOpen = false
                        try send(fd, frame("C", []))
                    }
                }
            }
            guard fds[0].revents != 0 else { continue }
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0, errno == EINTR || errno == EAGAIN { continue }
            guard n > 0 else { throw MicroVMError(.guestError, "the guest agent closed the connection before the process's status") }
            heard = Monotonic.seconds()
            reader.append(buf[0..<n])
            while let (type, payload) = try reader.next() {
                switch type {
                case UInt8(ascii: "O"): try output(1, payload)
                case UInt8(ascii: "D"): try output(2, payload)
                case UInt8(ascii: "F"): try output(2, Array("mvm-agent: ".utf8) + payload + [10])
                case UInt8(ascii: "S"):
                    guard let status = Int32(String(decoding: payload, as: UTF8.self)), (0...255).contains(status) else {
                        throw MicroVMError(.guestError, "the guest agent sent a status that is not one: \(String(decoding: payload.prefix(20), as: UTF8.self))")
                    }
                    return status
                default:
                    throw MicroVMError(.guestError, "the guest agent sent an unknown frame type \(type)")
                }
            }
        }
    }

    /// Splits the agent's byte stream into frames; a frame longer than `maxFrame` is an error.
    struct FrameReader {
        var buffer: [UInt8] = []
        var start = 0

        mutating func append(_ bytes: ArraySlice<UInt8>) {
            if start > 0, start == buffer.count { buffer.removeAll(keepingCapacity: true); start = 0 }
            buffer += bytes
        }

        mutating func next() throws -> (UInt8, [UInt8])? {
            guard buffer.count - start >= 5 else { return nil }
            let n = buffer[start + 1 ..< start + 5].reduce(0) { $0 << 8 | Int($1) }
            guard n <= GuestAgent.maxFrame else { throw MicroVMError(.guestError, "the guest agent sent a frame of \(n) bytes (at most \(GuestAgent.maxFrame))") }
            guard buffer.count - start >= 5 + n else { return nil }
            let frame = (buffer[start], Array(buffer[start + 5 ..< start + 5 + n]))
            start += 5 + n
            if start > 1 << 20 { buffer.removeFirst(start); start = 0 }
            return frame
        }
    }

    static func send(_ fd: Int32, _ bytes: [UInt8]) throws {
        var sent = 0
        while sent < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL)) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { throw MicroVMError(.backend, "cannot write to the guest agent: \(String(cString: strerror(errno)))") }
            sent += n
        }
    }

    /// The signals a relay sends on to the process in the guest (PWR is 30); WINCH becomes a
    /// resize when the process has a terminal.
    public static let relayedSignals: [Int32] = [SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2, SIGTERM, SIGWINCH, 30]

    /// A relay's `output` that writes the process's stdout and stderr to this process's own
    /// (or both to `terminal`), whole.
    public static func toStdio(terminal: Int32? = nil) -> (Int32, [UInt8]) -> Void {
        { stream, bytes in
            let fd = terminal ?? stream
            var done = 0
            while done < bytes.count {
                let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + done, bytes.count - done) }
                if n < 0, errno == EINTR { continue }
                guard n > 0 else { return }  // the reader is gone: the rest has nowhere to go
                done += n
            }
        }
    }

    /// Catches `signals` in this process, whichever thread they reach, and returns a descriptor
    /// that yields one byte per signal caught (its number), for `relay` to send on to the process.
    public static func signalDescriptor(_ signals: [Int32]) -> Int32? {
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { return nil }
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC); _ = fcntl(fd, F_SETFL, O_NONBLOCK) }
        signalPipe = fds[1]
        for s in signals {
            var action = sigaction()
            action.__sigaction_handler.sa_handler = { number in
                var byte = UInt8(truncatingIfNeeded: number)
                _ = Glibc.write(GuestAgent.signalPipe, &byte, 1)
            }
            action.sa_flags = SA_RESTART
            sigaction(s, &action, nil)
        }
        return fds[0]
    }

    /// The write end of `signalDescriptor`'s pipe, for the handler (which may not take a lock).
    nonisolated(unsafe) static var signalPipe: Int32 = -1

    /// A connection to the agent of the VM with context id `cid`.
    public static func connect(cid: UInt32, port: UInt32) throws -> Int32 {
        var addr = sockaddr_vm()
        addr.svm_family = sa_family_t(CVHOST_AF_VSOCK)
        addr.svm_cid = cid
        addr.svm_port = port
        return try connect(family: Int32(CVHOST_AF_VSOCK), to: addr, what: "the guest agent at vsock \(cid):\(port)",
                           hint: " (is the guest up, and was it started with --vsock-shell?)")
    }

    /// A connection to the agent of a VM that may still be booting: tried every `interval`
    /// seconds while `keepTrying` says so (it may throw to stop); the last failure otherwise.
    public static func connect(cid: UInt32, port: UInt32, interval: Double, while keepTrying: () throws -> Bool) throws -> Int32 {
        while true {
            do {
                return try connect(cid: cid, port: port)
            } catch {
                guard try keepTrying() else { throw error }
                usleep(useconds_t(interval * 1_000_000))
            }
        }
    }

    /// A connection to a unix socket: an agent's (`mvm-agent --unix PATH`), or `what` else.
    public static func connect(unixPath path: String, what: String = "the agent") throws -> Int32 {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { throw MicroVMError.invalidArgument("the unix socket path \(path) is too long") }
        withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: bytes) }
        return try connect(family: AF_UNIX, to: addr, what: "\(what) at \(path)", hint: "")
    }

    /// A stream socket of `family` connected to `address` (a `sockaddr_*`), or an error naming `what`.
    static func connect<Address>(family: Int32, to address: Address, what: String, hint: String) throws -> Int32 {
        let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else {
            let why = String(cString: strerror(errno))
            throw family == AF_UNIX ? MicroVMError(.backend, "cannot open a unix socket: \(why)")
                : MicroVMError(.unsupported, "cannot open a vsock socket (\(why)): load vhost_vsock (modprobe vhost_vsock)")
        }
        var address = address
        let ok = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<Address>.size)) }
        }
        guard ok == 0 else {
            let why = String(cString: strerror(errno))
            close(fd)
            throw MicroVMError(.backend, "cannot reach \(what): \(why)\(hint)")
        }
        return fd
    }
}
