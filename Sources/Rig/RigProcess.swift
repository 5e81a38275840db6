import Foundation
import MicroVMCore
#if canImport(Glibc)
import Glibc
#endif

/// The rig's QEMU in its own process group, so one kill takes it and anything it spawned.
/// Registered while alive, so a signal to mvm can still kill it; and tied to this process by a
/// lifeline, so even a SIGKILL of mvm (or of a test run) takes it: a watcher in QEMU's group
/// reads a pipe whose only write end this process holds, and kills the group when it hangs up.
final class RigChild: @unchecked Sendable {
    /// `finished`: `consume` had all it needed; `stopped`: `tick` asked to stop.
    enum Outcome: Equatable { case finished, stopped, exited, timedOut }

    let pid: pid_t
    /// Directories of this run (the scratch share, the monitor's), removed by `killAll`.
    let directories: [String]
    private let readFD: Int32
    /// The lifeline's write end: held until QEMU is reaped, closed by the kernel if mvm dies.
    private let lifelineFD: Int32
    private let lock = NSLock()
    private var reaped = false

    private init(pid: pid_t, readFD: Int32, lifelineFD: Int32, directories: [String]) {
        self.pid = pid; self.readFD = readFD; self.lifelineFD = lifelineFD; self.directories = directories
    }

    /// Starts the watcher (its output away from the console pipe, so QEMU's exit still ends the
    /// console), drops the lifeline from what QEMU inherits, then becomes QEMU: same pid, same
    /// group. On a hang-up the watcher kills QEMU, removes the run's directories once it is
    /// gone, and last kills the rest of the group, itself included. A normal end never gets
    /// there: `killAndReap` kills the whole group, the watcher with it, before it hangs up.
    static func lifelineScript(removing directories: [String]) -> String {
        let dirs = directories.map(ProcessRunner.shellQuote).joined(separator: " ")
        let cleanup = "read x <&3; kill -9 $$; n=0; while kill -0 $$ 2>/dev/null && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done; "
            + (dirs.isEmpty ? "" : "rm -rf -- \(dirs); ") + "kill -9 0"
        return "( exec </dev/null >/dev/null 2>&1; \(cleanup) ) & exec 3<&-; exec \"$0\" \"$@\""
    }

    static func spawn(_ argv: [String], stderrPath: String, directories: [String]) throws -> RigChild {
        var fds: [Int32] = [-1, -1], lifeline: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else {
            throw MicroVMError(.internalError, "pipe failed: \(String(cString: strerror(errno)))")
        }
        guard pipe(&lifeline) == 0 else {
            let e = errno
            fds.forEach { close($0) }
            throw MicroVMError(.internalError, "pipe failed: \(String(cString: strerror(e)))")
        }
        // Close-on-exec, so other children spawned meanwhile do not hold the console open, nor
        // the lifeline (only the watcher gets its read end, as descriptor 3).
        for fd in fds + lifeline { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, fds[1], 1)
        posix_spawn_file_actions_addopen(&actions, 2, stderrPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_adddup2(&actions, lifeline[0], 3)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        // A fresh group (killed as one) with default signal dispositions and an empty mask,
        // whatever mvm itself ignores or blocks.
        var none = sigset_t(); sigemptyset(&none)
        var all = sigset_t(); sigfillset(&all)
        posix_spawnattr_setsigmask(&attr, &none)
        posix_spawnattr_setsigdefault(&attr, &all)
        posix_spawnattr_setpgroup(&attr, 0)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

        let shell = ["/bin/sh", "-c", lifelineScript(removing: directories)] + argv
        let cargs: [UnsafeMutablePointer<CChar>?] = shell.map { strdup($0) } + [nil]
        defer { for p in cargs { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, shell[0], &actions, &attr, cargs, environ)
        close(fds[1])
        close(lifeline[0])
        guard rc == 0 else {
            close(fds[0])
            close(lifeline[1])
            throw MicroVMError(.backend, "cannot start '\(argv[0])': \(String(cString: strerror(rc)))")
        }
        let child = RigChild(pid: pid, readFD: fds[0], lifelineFD: lifeline[1], directories: directories)
        RigProcessRegistry.shared.add(child)
        return child
    }

    /// Reads the console until `consume` or `tick` says it is done, QEMU closes it, or the
    /// deadline passes; `tick` runs at least every 0.2 s meanwhile.
    func pump(deadline: Date, tick: () -> Bool = { false }, consume: ([UInt8]) -> Bool) -> Outcome {
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            if tick() { return .stopped }
            let left = deadline.timeIntervalSinceNow
            if left <= 0 { return .timedOut }
            var pfd = pollfd(fd: readFD, events: Int16(POLLIN), revents: 0)
            let r = poll(&pfd, 1, Int32(min(left * 1000, 200).rounded(.up)))
            if r < 0 { if errno == EINTR { continue }; return .exited }
            if r == 0 { continue }
            let n = buf.withUnsafeMutableBytes { read(readFD, $0.baseAddress, $0.count) }
            if n < 0 { if errno == EINTR || errno == EAGAIN { continue }; return .exited }
            if n == 0 { return .exited }
            if consume(Array(buf[0..<n])) { return .finished }
        }
    }

    /// Kills the whole group and waits for QEMU; idempotent.
    func killAndReap() {
        lock.lock()
        defer { lock.unlock() }
        guard !reaped else { return }
        reaped = true
        kill(-pid, SIGKILL)
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        close(readFD)
        close(lifelineFD)
        RigProcessRegistry.shared.remove(self)
    }

    /// For signal handlers: kill without waiting or taking the lock a blocked run may hold.
    func killGroup() { kill(-pid, SIGKILL) }
}

/// Rig children alive in this process, for SIGINT/SIGTERM cleanup.
final class RigProcessRegistry: @unchecked Sendable {
    static let shared = RigProcessRegistry()
    private let lock = NSLock()
    private var children: [ObjectIdentifier: RigChild] = [:]
    private var sources: [any DispatchSourceSignal] = []

    func add(_ c: RigChild) { lock.lock(); children[ObjectIdentifier(c)] = c; lock.unlock() }
    func remove(_ c: RigChild) { lock.lock(); children[ObjectIdentifier(c)] = nil; lock.unlock() }

    func killAll() {
        lock.lock(); let all = Array(children.values); lock.unlock()
        for c in all {
            c.killGroup()
            var status: Int32 = 0
            _ = waitpid(c.pid, &status, 0)
            for d in c.directories { try? FileManager.default.removeItem(atPath: d) }
        }
    }

    func installSignalHandlers() {
        lock.lock(); defer { lock.unlock() }
        guard sources.isEmpty else { return }
        for sig in [SIGINT, SIGTERM, SIGHUP] {
            signal(sig, SIG_IGN)
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler { [weak self] in
                self?.killAll()
                FileHandle.standardError.write(Data("mvm: interrupted; the rig was stopped\n".utf8))
                exit(128 + sig)
            }
            s.resume()
            sources.append(s)
        }
    }
}
