import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Runs external programs (qemu-img, runc, mke2fs, …) and captures their output.
/// One place for it, so every module gets timeouts and clear "not installed" errors alike.
public enum ProcessRunner {
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
        precondition(!argv.isEmpty)
        guard let exe = which(argv[0]) else {
            let fix = package.map { ": install it with 'apt-get install \($0)'" } ?? ""
            throw MicroVMError.notFound("'\(argv[0])' is not installed\(fix)")
        }
        // posix_spawn rather than Foundation's Process: Process only reports the exit once every
        // holder of the output pipes has closed them, so a daemon the program started (runc's
        // init, an iperf3 server) would hold the run open.
        var env = ProcessInfo.processInfo.environment
        if let environment { env.merge(environment) { _, new in new } }
        let outPipe = try makePipe(), errPipe = try makePipe()
        let inPipe: (read: Int32, write: Int32)? = input == nil ? nil : try makePipe()
        defer { for fd in [outPipe.read, errPipe.read] { close(fd) } }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        if let inPipe { posix_spawn_file_actions_adddup2(&actions, inPipe.read, 0) }
        else { posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0) }
        posix_spawn_file_actions_adddup2(&actions, outPipe.write, 1)
        posix_spawn_file_actions_adddup2(&actions, errPipe.write, 2)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        // Children inherit the spawning thread's signal mask, and threads of Swift's executors
        // and of Dispatch block most signals: reset the mask and the dispositions.
        var empty = sigset_t(), all = sigset_t()
        sigemptyset(&empty); sigfillset(&all)
        posix_spawnattr_setsigmask(&attr, &empty)
        posix_spawnattr_setsigdefault(&attr, &all)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        // Glibc's addchdir_np is not exported to Swift; coreutils' env changes directory instead.
        let args = (currentDirectory.map { ["/usr/bin/env", "--chdir=\($0)"] } ?? []) + [exe] + argv.dropFirst()
        let program = currentDirectory == nil ? exe : "/usr/bin/env"
        let envStrings = env.map { "\($0.key)=\($0.value)" }
        var pid: pid_t = 0
        let rc = withCStrings(args) { argvp in
            withCStrings(envStrings) { envp in posix_spawn(&pid, program, &actions, &attr, argvp, envp) }
        }
        close(outPipe.write); close(errPipe.write)
        if let inPipe { close(inPipe.read) }
        guard rc == 0 else {
            throw MicroVMError(.backend, "cannot start '\(exe)': \(String(cString: strerror(rc)))"
                               + (currentDirectory.map { " (in \($0))" } ?? ""))
        }
        if let input, let inPipe {
            let fd = inPipe.write
            var sent = 0
            input.withUnsafeBytes { buf in
                while sent < buf.count {
                    let n = Glibc.write(fd, buf.baseAddress! + sent, buf.count - sent)
                    if n > 0 { sent += n } else if n < 0 && errno == EINTR { continue } else { break }
                }
            }
        }
        if let inPipe { close(inPipe.write) }
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
        let deadline = timeout.map { Date().addingTimeInterval($0) }
        var timedOut = false
        var status: Int32 = 0
        while true {
            let r = waitpid(pid, &status, deadline == nil ? 0 : WNOHANG)
            if r == pid { break }
            if r < 0 && errno != EINTR { break }
            if let deadline, r == 0 {
                if Date() >= deadline && !timedOut { timedOut = true; kill(pid, SIGKILL) }
                usleep(5_000)
            }
        }
        exited.store(true, ordering: .releasing)
        group.wait()
        let code: Int32 = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
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
            let err = out.stderrText.trimmingCharacters(in: .whitespacesAndNewlines)
            throw MicroVMError(.backend, "'\(argv.prefix(3).joined(separator: " "))' exited with status \(out.status): \(err.suffix(2000))")
        }
        return out
    }
}

extension ProcessRunner {
    static func makePipe() throws -> (read: Int32, write: Int32) {
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

    /// Reads `fd` until EOF, or until the program has exited and nothing more came for a second.
    static func drain(fd: Int32, exited: borrowing Atomic<Bool>) -> Data {
        var out = Data()
        var buf = [UInt8](repeating: 0, count: 65536)
        var quietSince: Date?
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
                if let q = quietSince { if Date().timeIntervalSince(q) > 1 { return out } } else { quietSince = Date() }
            }
        }
    }
}

private final class DataBox: @unchecked Sendable {
    private let lock = NSLock()
    private var slots: [Int: Data] = [:]
    func set(_ i: Int, _ d: Data) { lock.lock(); slots[i] = d; lock.unlock() }
    func get(_ i: Int) -> Data { lock.lock(); defer { lock.unlock() }; return slots[i] ?? Data() }
}
