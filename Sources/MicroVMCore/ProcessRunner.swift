import FoundationEssentials
import Dispatch
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Runs external programs (qemu-img, runc, mke2fs, …) and captures their output.
/// One place for it, so every module gets timeouts and clear "not installed" errors alike.
public enum ProcessRunner {
    /// `s` as one word of a POSIX shell command line: single-quoted, inner quotes escaped.
    public static func shellQuote(_ s: String) -> String { "'" + s.replacing("'", with: "'\\''") + "'" }

    public struct Output: Sendable {
        public var status: Int32
        public var stdout: Data
        public var stderr: Data
        public var timedOut: Bool
        public var stdoutText: String { String(decoding: stdout, as: UTF8.self) }
        public var stderrText: String { String(decoding: stderr, as: UTF8.self) }
    }

    /// Finds an executable on PATH (plus the sbin directories, which non-login shells may lack).
    public static func which(_ name: String) -> String? {
        if name.contains("/") { return FileManager.default.isExecutableFile(atPath: name) ? name : nil }
        let path = (ProcessInfo.processInfo.environment["PATH"] ?? "") + ":/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"
        for dir in path.split(separator: ":") {
            let p = "\(dir)/\(name)"
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        return nil
    }

    /// Runs `argv` to completion. Throws `.notFound` when the program is missing (naming the
    /// Debian package when `package` is given); a non-zero exit is returned, not thrown.
    public static func run(_ argv: [String], input: Data? = nil, environment: [String: String]? = nil,
                           currentDirectory: String? = nil, timeout: Double? = nil, package: String? = nil) throws -> Output {
        let outPipe = try makePipe(), errPipe = try makePipe()
        let inPipe: (read: Int32, write: Int32)? = input == nil ? nil : try makePipe()
        defer { for fd in [outPipe.read, errPipe.read] { close(fd) } }
        let child: ChildProcess
        do {
            child = try ChildProcess(argv, stdin: inPipe.map { .descriptor($0.read) } ?? .null,
                                     stdout: .descriptor(outPipe.write), stderr: .descriptor(errPipe.write),
                                     environment: environment, currentDirectory: currentDirectory, package: package)
        } catch {
            for fd in [outPipe.write, errPipe.write] + (inPipe.map { [$0.read, $0.write] } ?? []) { close(fd) }
            throw error
        }
        close(outPipe.write); close(errPipe.write)
        if let inPipe { close(inPipe.read) }
        // Readers poll instead of blocking until EOF: a grandchild that inherited the pipes
        // must not keep us waiting after the program exited.
        let collected = DataBox()
        let exited = Atomic<Bool>(false)
        let group = DispatchGroup()
        for (i, fd) in [outPipe.read, errPipe.read].enumerated() {
            group.enter()
            DispatchQueue.global().async {
                collected.set(i, Self.drain(fd: fd, exited: exited))
                group.leave()
            }
        }
        // Input after the readers started: a child that answers before reading all of it
        // must not fill its output pipe and stall us both.
        if let input, let inPipe, input.count <= 16 << 10 {
            // Fits the empty pipe's buffer (64 KiB): written at once, without waiting for a
            // thread. On a small machine GCD's pool may be busy with the readers and the caller
            // (itself often on a pool thread), and a queued writer then waited seconds.
            Self.feed(fd: inPipe.write, input, exited: exited)
            close(inPipe.write)
        } else if let input, let inPipe {
            // On its own thread, so the timeout holds even for a child that never reads.
            group.enter()
            DispatchQueue.global().async {
                Self.feed(fd: inPipe.write, input, exited: exited)
                close(inPipe.write)
                group.leave()
            }
        }
        let (code, timedOut) = child.wait(timeout: timeout)
        exited.store(true, ordering: .releasing)
        group.wait()
        return Output(status: code, stdout: collected.get(0), stderr: collected.get(1), timedOut: timedOut)
    }

    /// Runs and throws `.backend` with stderr when the exit status is not zero.
    @discardableResult
    public static func check(_ argv: [String], input: Data? = nil, environment: [String: String]? = nil,
                             currentDirectory: String? = nil, timeout: Double? = nil, package: String? = nil) throws -> Output {
        let out = try run(argv, input: input, environment: environment, currentDirectory: currentDirectory, timeout: timeout, package: package)
        if out.timedOut {
            throw MicroVMError(.timeout, "'\(argv.joined(separator: " "))' did not finish within \(Int(timeout ?? 0)) s and was killed")
        }
        guard out.status == 0 else {
            let err = out.stderrText.trimmed()
            throw MicroVMError(.backend, "'\(argv.prefix(3).joined(separator: " "))' exited with status \(out.status): \(err.suffix(2000))")
        }
        return out
    }
}

extension ProcessRunner {
    /// A pipe whose two ends are close-on-exec, so only the dup'ed copies reach a child.
    public static func makePipe() throws -> (read: Int32, write: Int32) {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw SystemCallError("pipe", errno: errno) }
        // Close-on-exec, so only the dup2'ed copies reach the child.
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        return (fds[0], fds[1])
    }

    static func withCStrings<R>(_ strings: [String], _ body: (UnsafePointer<UnsafeMutablePointer<CChar>?>) -> R) -> R {
        let ptrs = strings.map { strdup($0) } + [nil]
        defer { for p in ptrs { free(p) } }
        return ptrs.withUnsafeBufferPointer { body($0.baseAddress!) }
    }

    /// A program that exits before reading all its input gives EPIPE rather than a SIGPIPE that
    /// would end this process; set once, for the whole process.
    private static let ignoreSIGPIPE: Void = { signal(SIGPIPE, SIG_IGN) }()

    /// Writes `data` to `fd` until done, the reader is gone (EPIPE), or the program has exited and
    /// the pipe stayed full for a second (a grandchild holding stdin open never blocks us). The
    /// mirror of `drain`.
    static func feed(fd: Int32, _ data: Data, exited: borrowing Atomic<Bool>) {
        _ = ignoreSIGPIPE
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        var sent = 0
        var stuckSince: Double?
        data.withUnsafeBytes { buf in
            while sent < buf.count {
                let n = Glibc.write(fd, buf.baseAddress! + sent, buf.count - sent)
                if n > 0 { sent += n; stuckSince = nil; continue }
                guard n < 0, errno == EAGAIN || errno == EINTR else { return }
                if exited.load(ordering: .acquiring) {
                    let now = Monotonic.seconds()
                    if let t = stuckSince { if now - t > 1 { return } } else { stuckSince = now }
                }
                var pfd = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                _ = poll(&pfd, 1, 100)
            }
        }
    }

    /// Reads `fd` until EOF, or until the program has exited and nothing more came for a second.
    static func drain(fd: Int32, exited: borrowing Atomic<Bool>) -> Data {
        var out = Data()
        var buf = [UInt8](repeating: 0, count: 65536)
        var quietSince: Double?
        while true {
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let r = poll(&pfd, 1, 100)
            if r > 0 {
                let n = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
                if n > 0 { out.append(contentsOf: buf[0..<n]); quietSince = nil; continue }
                if n == 0 { return out }
                if errno == EINTR || errno == EAGAIN { continue }
                return out
            }
            if r < 0 && errno != EINTR { return out }
            if exited.load(ordering: .acquiring) {
                if let q = quietSince { if Monotonic.seconds() - q > 1 { return out } } else { quietSince = Monotonic.seconds() }
            }
        }
    }
}

private final class DataBox: Sendable {
    private let slots = Mutex<[Int: Data]>([:])
    func set(_ i: Int, _ d: Data) { slots.withLock { $0[i] = d } }
    func get(_ i: Int) -> Data { slots.withLock { $0[i] ?? Data() } }
}
