import Foundation
import Testing
@testable import Host
@testable import Images
import MicroVMCore

/// The guest agent (images/agent/mvm-agent.c), compiled as an image build compiles it and run
/// on the host over a unix socket (the host has no vsock of its own), driven by the host's
/// client: the same program and protocol `mvm exec` and `mvm-runtime exec` reach over vsock.
@Suite(.serialized) struct GuestAgentTests {
    /// A running agent on a unix socket in a scratch directory, killed at the end.
    final class Agent {
        let dir: String
        let socket: String
        let pid: pid_t

        init(root: String? = nil, statusFIFO: String? = nil) throws {
            dir = FileManager.default.temporaryDirectory.path + "/mvm-agent-test-\(getpid())-\(UInt32.random(in: 0 ... .max))"
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            let binary = dir + "/mvm-agent"
            try RootfsBuilder.compileStatic(source: Paths.sourceDirectory() + "/images/agent/mvm-agent.c", output: binary, what: "guest agent")
            socket = dir + "/agent.sock"
            pid = try ChildProcess.detached([binary, "--unix", socket] + (root.map { ["--root", $0] } ?? []) + (statusFIFO.map { ["--status-fifo", $0] } ?? []),
                                            executable: binary)
            // Listening, not only bound: the socket's file appears before the agent listens on it.
            for _ in 0..<500 {
                if let fd = try? GuestAgent.connect(unixPath: socket) { close(fd); break }
                usleep(10_000)
            }
        }

        func run(_ request: GuestAgent.Request, input: Int32? = nil, signals: Int32? = nil) throws -> (status: Int32, out: String, err: String) {
            let fd = try GuestAgent.connect(unixPath: socket)
            defer { close(fd) }
            var out: [UInt8] = [], err: [UInt8] = []
            let status = try GuestAgent.relay(fd, request, input: input, signals: signals, timeout: 30) { stream, bytes in
                if stream == 1 { out += bytes } else { err += bytes }
            }
            return (status, String(decoding: out, as: UTF8.self), String(decoding: err, as: UTF8.self))
        }

        deinit {
            kill(pid, SIGKILL)
            var status: Int32 = 0
            waitpid(pid, &status, 0)
            try? FileManager.default.removeItem(atPath: dir)
        }
    }

    @Test func runsAProcessWithItsOwnStdoutStderrAndStatus() throws {
        let agent = try Agent()
        let r = try agent.run(.init(arguments: ["sh", "-c", "echo out; echo err >&2; exit 7"]))
        #expect(r == (7, "out\n", "err\n"))
        let many = try agent.run(.init(arguments: ["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x"]))
        #expect(many.status == 0 && many.out.count == 3_000_000 && many.out.allSatisfy { $0 == "x" })
    }

    @Test func takesEnvironmentDirectoryAndUser() throws {
        let agent = try Agent()
        let r = try agent.run(.init(arguments: ["sh", "-c", "echo $GREETING; pwd; id -u; id -g; echo ${HOME:-none}"],
                                    environment: ["PATH=/usr/bin:/bin", "GREETING=hello there"], workingDirectory: "/tmp",
                                    user: .init(uid: 65534, gid: 65533)))
        #expect(r.status == 0)
        #expect(r.out == "hello there\n/tmp\n65534\n65533\nnone\n", "\(r)")
        // An environment without PATH gets the usual one, and nothing else.
        let path = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
        #expect(try agent.run(.init(arguments: ["env"])).out == path)
        #expect(try agent.run(.init(arguments: ["env"], environment: ["ONLY=1"])).out == "ONLY=1\n" + path)
    }

    @Test func setsTheResourceLimitsItIsGiven() throws {
        let agent = try Agent()
        var request = GuestAgent.Request(arguments: ["sh", "-c", "ulimit -n; ulimit -Hn"])
        request.limits = [.init(resource: 7, soft: 64, hard: 128)]  // RLIMIT_NOFILE
        #expect(try agent.run(request) == (0, "64\n128\n", ""))
        request.limits = [.init(resource: 7, soft: 256, hard: 128)]
        let refused = try agent.run(request)
        #expect(refused.status == 126 && refused.err.contains("cannot set resource limit 7"), "\(refused)")
    }

    @Test func aProcessThatCannotRunGetsAShellsStatusAndWhy() throws {
        let agent = try Agent()
        let missing = try agent.run(.init(arguments: ["no-such-command-here"]))
        #expect(missing.status == 127 && missing.err.contains("cannot run no-such-command-here"))
        let badDir = try agent.run(.init(arguments: ["true"], workingDirectory: "/no/such/dir"))
        #expect(badDir.status == 126 && badDir.err.contains("cannot enter /no/such/dir"))
        #expect(throws: MicroVMError.self) { try agent.run(.init(arguments: [])) }
    }

    @Test func copiesStdinToTheProcess() throws {
        let agent = try Agent()
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        // More than the agent keeps pending at once, so it must wait for the process to read.
        let input = Data(repeating: UInt8(ascii: "a"), count: 300_000) + Data("\nend\n".utf8)
        let end = fds[1]
        let writer = Thread { input.withUnsafeBytes { _ = write(end, $0.baseAddress, $0.count) }; close(end) }
        writer.start()
        let r = try agent.run(.init(arguments: ["sh", "-c", "wc -c; echo done"]), input: fds[0])
        close(fds[0])
        #expect(r.status == 0 && r.out == "300005\ndone\n", "\(r)")
    }

    @Test func sendsSignalsOnToTheProcessAndAStopWhenTheHostGoes() throws {
        let agent = try Agent()
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        let end = fds[1]
        let sender = Thread { usleep(300_000); var b = UInt8(SIGTERM); _ = write(end, &b, 1) }
        sender.start()
        let start = Monotonic.seconds()
        let r = try agent.run(.init(arguments: ["sleep", "30"]), signals: fds[0])
        #expect(r.status == 128 + SIGTERM && Monotonic.seconds() - start < 10)
        close(fds[0]); close(fds[1])

        // A host that hangs up ends the process: it is not left running in the guest.
        let marker = agent.dir + "/alive"
        let fd = try GuestAgent.connect(unixPath: agent.socket)
        try GuestAgent.send(fd, GuestAgent.Request(arguments: ["sh", "-c", "touch \(marker); sleep 30; rm \(marker)"]).frames)
        for _ in 0..<300 where !FileManager.default.fileExists(atPath: marker) { usleep(10_000) }
        close(fd)
        usleep(500_000)
        let left = try ProcessRunner.run(["pgrep", "-f", "touch \(marker)"], timeout: 10)
        #expect(left.status != 0, "the process outlived its host: \(left.stdoutText)")
    }

    @Test func runsInsideTheRootItIsGiven() throws {
        let root = FileManager.default.temporaryDirectory.path + "/mvm-agent-root-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: root) }
        try FileManager.default.createDirectory(atPath: root + "/bin", withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: "/bin/busybox", toPath: root + "/bin/busybox")
        try FileManager.default.createSymbolicLink(atPath: root + "/bin/sh", withDestinationPath: "busybox")
        try Data("inside\n".utf8).write(to: URL(fileURLWithPath: root + "/marker"))
        let agent = try Agent(root: root)
        let r = try agent.run(.init(arguments: ["/bin/sh", "-c", "read line < /marker; echo $line; echo /*"]))
        #expect(r.status == 0 && r.out == "inside\n/bin /marker\n", "\(r)")
    }

    /// The VM's own process (`M`): its status also goes to the FIFO the guest init waits on.
    @Test func theMainProcessHandsItsStatusToTheInit() throws {
        let fifo = FileManager.default.temporaryDirectory.path + "/mvm-agent-status-\(getpid())"
        defer { unlink(fifo) }
        #expect(mkfifo(fifo, 0o600) == 0)
        let agent = try Agent(statusFIFO: fifo)
        let r = try agent.run(.init(arguments: ["sh", "-c", "echo main; exit 9"], main: true))
        #expect(r == (9, "main\n", ""))
        let fd = open(fifo, O_RDONLY | O_NONBLOCK)
        defer { close(fd) }
        // The agent waits for the init to open the FIFO; it writes once this end is open.
        var text = [UInt8](repeating: 0, count: 16)
        var n = 0
        for _ in 0..<500 {
            n = read(fd, &text, text.count)
            if n > 0 { break }
            usleep(10_000)
        }
        #expect(String(decoding: text.prefix(max(0, n)), as: UTF8.self) == "9\n")
    }

    /// A terminal in the guest: the process's stdin, stdout and stderr and its controlling
    /// terminal, of the size asked for, resized while it runs (the process sees SIGWINCH).
    @Test func givesTheProcessATerminalAndResizesIt() throws {
        let agent = try Agent()
        let r = try agent.run(.init(arguments: ["sh", "-c", "tty; stty size; echo err >&2; exit 2"], terminal: true, size: .init(rows: 40, columns: 100)))
        #expect(r.status == 2 && r.err.isEmpty, "\(r)")
        #expect(r.out.contains("/dev/pts/") && r.out.contains("40 100\r\n") && r.out.contains("err\r\n"), "\(r.out)")

        let fd = try GuestAgent.connect(unixPath: agent.socket)
        defer { close(fd) }
        let request = GuestAgent.Request(arguments: ["sh", "-c", "trap 'stty size; exit 3' WINCH; echo ready; while :; do sleep 0.1; done"],
                                         terminal: true, size: .init(rows: 24, columns: 80))
        try GuestAgent.send(fd, request.frames)
        var reader = GuestAgent.FrameReader()
        var out = ""
        var status: String?
        var resized = false
        var buf = [UInt8](repeating: 0, count: 4096)
        var tv = timeval(tv_sec: 20, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        while status == nil {
            let n = read(fd, &buf, buf.count)
            guard n > 0 else { break }
            reader.append(buf[0..<n])
            while let (type, payload) = try reader.next() {
                if type == UInt8(ascii: "O") { out += String(decoding: payload, as: UTF8.self) }
                if type == UInt8(ascii: "S") { status = String(decoding: payload, as: UTF8.self) }
            }
            if !resized, out.contains("ready") {
                try GuestAgent.send(fd, GuestAgent.Request.WindowSize(rows: 50, columns: 120).frame)
                resized = true
            }
        }
        #expect(status == "3" && out.contains("50 120"), "\(String(describing: status)) \(out)")
    }

    @Test func aFrameLongerThanTheLimitEndsTheExchange() throws {
        var reader = GuestAgent.FrameReader()
        reader.append([UInt8(ascii: "O"), 0, 0, 0, 3, 1, 2, 3, UInt8(ascii: "O"), 0x7f, 0xff, 0xff, 0xff][...])
        #expect(try reader.next()?.1 == [1, 2, 3])
        #expect(throws: MicroVMError.self) { try reader.next() }
        var partial = GuestAgent.FrameReader()
        partial.append([UInt8(ascii: "S"), 0, 0, 0, 2, UInt8(ascii: "4")][...])
        #expect(try partial.next() == nil)
        partial.append([UInt8(ascii: "2")][...])
        #expect(try partial.next()?.1 == Array("42".utf8))
    }
}
