import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A program started with posix_spawn, waited for with waitpid: its exit is known the moment it
/// exits, whoever else still holds its output pipes (a daemon it started, a grandchild), which
/// Foundation's `Process` does not guarantee. Every program the project runs starts here.
public final class ChildProcess: Sendable {
    /// Where one of the child's standard streams goes.
    public enum Stream: Sendable {
        case null
        /// A descriptor of ours, dup'ed into the child (the caller keeps and closes its own).
        case descriptor(Int32)
    }

    public let pid: pid_t
    public let executable: String
    private let reaped = Mutex<Int32?>(nil)

    /// Starts `argv` (looked up on PATH) with an empty signal mask and default dispositions.
    /// Throws `.notFound`, naming the Debian package when `package` is given, when it is missing.
    public init(_ argv: [String], stdin: Stream = .null, stdout: Stream = .null, stderr: Stream = .null,
                environment: [String: String]? = nil, currentDirectory: String? = nil, package: String? = nil) throws {
        precondition(!argv.isEmpty)
        guard let exe = ProcessRunner.which(argv[0]) else {
            let fix = package.map { ": install it with 'apt-get install \($0)'" } ?? ""
            throw MicroVMError.notFound("'\(argv[0])' is not installed\(fix)")
        }
        var env = ProcessInfo.processInfo.environment
        if let environment { env.merge(environment) { _, new in new } }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for (target, stream) in [(Int32(0), stdin), (1, stdout), (2, stderr)] {
            switch stream {
            case .null: posix_spawn_file_actions_addopen(&actions, target, "/dev/null", target == 0 ? O_RDONLY : O_WRONLY, 0)
            case .descriptor(let fd): posix_spawn_file_actions_adddup2(&actions, fd, target)
            }
        }
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
        var pid: pid_t = 0
        let rc = ProcessRunner.withCStrings(args) { argvp in
            ProcessRunner.withCStrings(env.map { "\($0.key)=\($0.value)" }) { envp in posix_spawn(&pid, program, &actions, &attr, argvp, envp) }
        }
        guard rc == 0 else {
            throw MicroVMError(.backend, "cannot start '\(exe)': \(String(cString: strerror(rc)))"
                               + (currentDirectory.map { " (in \($0))" } ?? ""))
        }
        self.pid = pid
        self.executable = exe
    }

    /// The exit status the shell's way (128 + signal for a kill), once the child has exited.
    public var exitStatus: Int32? { reap() }

    public var isRunning: Bool { exitStatus == nil }

    /// Sends `signal` unless the child has already been reaped (its pid may be reused then).
    public func signal(_ signal: Int32) {
        reaped.withLock { if $0 == nil { _ = Glibc.kill(pid, signal) } }
    }

    /// Waits for the exit; after `timeout` seconds kills the child (SIGKILL) and then waits.
    public func wait(timeout: Double? = nil) -> (status: Int32, timedOut: Bool) {
        guard let timeout else { return (waitForExit(), false) }
        if let s = wait(upTo: timeout) { return (s, false) }
        signal(SIGKILL)
        return (waitForExit(), true)
    }

    /// Waits at most `seconds` for the exit; nil when the child is still running then.
    public func wait(upTo seconds: Double) -> Int32? {
        let deadline = ProcessRunner.monotonicNow() + seconds
        while true {
            if let s = reap() { return s }
            if ProcessRunner.monotonicNow() >= deadline { return nil }
            usleep(1_000)
        }
    }

    private func waitForExit() -> Int32 {
        while true {
            if let s = reap() { return s }
            // Sleep until the child has exited without reaping it (WNOWAIT), then reap under
            // the lock, so a concurrent `exitStatus` can never reap it first and lose the status.
            var info = siginfo_t()
            if waitid(P_PID, id_t(pid), &info, WEXITED | WNOWAIT) < 0 && errno != EINTR {
                return reap() ?? 128 + SIGKILL
            }
        }
    }

    private func reap() -> Int32? {
        reaped.withLock { stored in
            if let stored { return stored }
            var status: Int32 = 0
            var r: pid_t
            repeat { r = waitpid(pid, &status, WNOHANG) } while r < 0 && errno == EINTR
            guard r == pid else { return nil }
            let code: Int32 = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
            stored = code
            return code
        }
    }

    deinit {
        // Never leave a zombie behind: a child nobody waited for is killed and reaped.
        if reaped.withLock({ $0 }) == nil {
            _ = Glibc.kill(pid, SIGKILL)
            var status: Int32 = 0
            _ = waitpid(pid, &status, 0)
        }
    }
}

extension ProcessRunner {
    static func monotonicNow() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}
