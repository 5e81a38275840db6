import CLinux
import FoundationEssentials
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
    /// A pidfd (Linux 5.3+): readable once the child has exited, so timed waits sleep in poll(2)
    /// instead of polling waitpid; -1 where the kernel or C library has none.
    private let pidFD: Int32

    /// Starts `argv` (looked up on PATH) with an empty signal mask and default dispositions.
    /// Throws `.notFound`, naming the Debian package when `package` is given, when it is missing.
    /// `inherit` are descriptors of ours the child gets as 3, 4, …; with `newPIDNamespace` it is
    /// the first process (pid 1) of a PID namespace of its own.
    public init(_ argv: [String], stdin: Stream = .null, stdout: Stream = .null, stderr: Stream = .null,
                environment: [String: String]? = nil, currentDirectory: String? = nil, package: String? = nil,
                inherit: [Int32] = [], newPIDNamespace: Bool = false) throws {
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
        for (i, fd) in inherit.enumerated() { posix_spawn_file_actions_adddup2(&actions, fd, Int32(3 + i)) }
        var attr = posix_spawnattr_t()
        Self.initAttributes(&attr, newSession: false)
        defer { posix_spawnattr_destroy(&attr) }
        // Glibc's addchdir_np is not exported to Swift; coreutils' env changes directory instead.
        let args = (currentDirectory.map { ["/usr/bin/env", "--chdir=\($0)"] } ?? []) + [exe] + argv.dropFirst()
        let program = currentDirectory == nil ? exe : "/usr/bin/env"
        var pid: pid_t = 0
        let spawn = { (pid: inout pid_t) -> Int32 in
            ProcessRunner.withCStrings(args) { argvp in
                ProcessRunner.withCStrings(env.map { "\($0.key)=\($0.value)" }) { envp in posix_spawn(&pid, program, &actions, &attr, argvp, envp) }
            }
        }
        let rc = newPIDNamespace ? Self.inNewPIDNamespace(&pid, spawn) : spawn(&pid)
        guard rc == 0 else {
            throw MicroVMError(.backend, "cannot start '\(exe)': \(String(cString: strerror(rc)))"
                               + (currentDirectory.map { " (in \($0))" } ?? ""))
        }
        self.pid = pid
        self.executable = exe
        self.pidFD = Self.pidfdOpen(pid)
    }

    /// Spawn attributes with an empty signal mask and default dispositions: children inherit the
    /// spawning thread's mask, and threads of Swift's executors and of Dispatch block most
    /// signals. `newSession`: the child leads a session of its own (POSIX_SPAWN_SETSID, 0x80 in glibc).
    static func initAttributes(_ attr: inout posix_spawnattr_t, newSession: Bool) {
        posix_spawnattr_init(&attr)
        var empty = sigset_t(), all = sigset_t()
        sigemptyset(&empty); sigfillset(&all)
        posix_spawnattr_setsigmask(&attr, &empty)
        posix_spawnattr_setsigdefault(&attr, &all)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | (newSession ? 0x80 : 0)))
    }

    /// Starts `argv` from `executable` in a session of its own with this process's descriptors
    /// (`stdio` as its stdin, stdout and stderr, when given), and lets it go: nothing here waits
    /// for it (a subreaper above, or init, reaps it).
    public static func detached(_ argv: [String], executable: String, stdio: Int32? = nil) throws -> pid_t {
        var attr = posix_spawnattr_t()
        initAttributes(&attr, newSession: true)
        defer { posix_spawnattr_destroy(&attr) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        if let stdio { for target in Int32(0)...2 { posix_spawn_file_actions_adddup2(&actions, stdio, target) } }
        var pid: pid_t = 0
        let rc = ProcessRunner.withCStrings(argv) { argvp in posix_spawn(&pid, executable, &actions, &attr, argvp, environ) }
        guard rc == 0 else { throw MicroVMError(.backend, "cannot start '\(executable)': \(String(cString: strerror(rc)))") }
        return pid
    }

    /// Runs `spawn` on a thread of its own that first unshares its PID namespace, so the child
    /// it starts is pid 1 of a new one. The namespace for children is a thread's: the calling
    /// thread, and any other child, are left as they were.
    static func inNewPIDNamespace(_ pid: inout pid_t, _ spawn: (inout pid_t) -> Int32) -> Int32 {
        var child: pid_t = 0, result: Int32 = 0
        withoutActuallyEscaping({
            result = clinux_unshare(0x2000_0000) == 0 ? spawn(&child) : errno  // CLONE_NEWPID
        }) { work in
            final class Box { let work: () -> Void; init(_ w: @escaping () -> Void) { work = w } }
            let box = Unmanaged.passRetained(Box(work))
            var thread = pthread_t()
            // SAFETY: the thread is joined here, so `work` does not outlive this call.
            let created = pthread_create(&thread, nil, { context in
                Unmanaged<Box>.fromOpaque(context!).takeRetainedValue().work()
                return nil
            }, box.toOpaque())
            if created == 0 { pthread_join(thread, nil) } else { box.release(); result = created }
        }
        pid = child
        return result
    }

    /// A descriptor that becomes readable when process `pid` exits; -1 (errno set) where the
    /// kernel has no pidfd_open (before 5.3).
    public static func pidfdOpen(_ pid: pid_t) -> Int32 { clinux_pidfd_open(pid, 0) }

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

    /// Waits at most `seconds` for the exit; nil when the child is still running then. Sleeps in
    /// poll(2) on the pidfd (no wake-ups while a long run goes on); without one, re-checks with a
    /// back-off from 1 to 20 ms.
    public func wait(upTo seconds: Double) -> Int32? {
        let deadline = Monotonic.seconds() + seconds
        var pause: useconds_t = 1_000
        while true {
            if let s = reap() { return s }
            let left = deadline - Monotonic.seconds()
            if left <= 0 { return nil }
            if pidFD >= 0 {
                var pfd = pollfd(fd: pidFD, events: Int16(POLLIN), revents: 0)
                _ = poll(&pfd, 1, Int32(min(left * 1000 + 1, 60_000)))
            } else {
                usleep(min(pause, useconds_t(left * 1e6) + 1))
                pause = min(pause * 2, 20_000)
            }
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
        if pidFD >= 0 { close(pidFD) }
        // Never leave a zombie behind: a child nobody waited for is killed and reaped.
        if reaped.withLock({ $0 }) == nil {
            _ = Glibc.kill(pid, SIGKILL)
            var status: Int32 = 0
            _ = waitpid(pid, &status, 0)
        }
    }
}
