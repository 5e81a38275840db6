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
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = Array(argv.dropFirst())
        if let environment {
            p.environment = ProcessInfo.processInfo.environment.merging(environment) { _, new in new }
        }
        if let currentDirectory { p.currentDirectoryURL = URL(fileURLWithPath: currentDirectory) }
        let outPipe = Pipe(), errPipe = Pipe()
        p.standardOutput = outPipe
        p.standardError = errPipe
        let inPipe: Pipe? = input == nil ? nil : Pipe()
        p.standardInput = inPipe ?? FileHandle.nullDevice
        try spawnWithDefaultSignalMask { try p.run() }
        if let input, let inPipe {
            DispatchQueue.global().async {
                try? inPipe.fileHandleForWriting.write(contentsOf: input)
                try? inPipe.fileHandleForWriting.close()
            }
        }
        // Readers poll instead of blocking until EOF: a grandchild that inherited the pipes
        // (a daemon the program started) must not keep us waiting after the program exited.
        let collected = DataBox()
        let exited = Atomic<Bool>(false)
        let group = DispatchGroup()
        for (i, pipe) in [outPipe, errPipe].enumerated() {
            group.enter()
            let fd = pipe.fileHandleForReading.fileDescriptor
            DispatchQueue.global().async {
                collected.set(i, Self.drain(fd: fd, exited: exited))
                group.leave()
            }
        }
        var timedOut = false
        if let timeout {
            let deadline = Date().addingTimeInterval(timeout)
            while p.isRunning && Date() < deadline { usleep(10_000) }
            if p.isRunning {
                timedOut = true
                kill(p.processIdentifier, SIGKILL)
            }
        }
        p.waitUntilExit()
        exited.store(true, ordering: .releasing)
        group.wait()
        return Output(status: p.terminationStatus, stdout: collected.get(0), stderr: collected.get(1), timedOut: timedOut)
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
    /// Children inherit the spawning thread's signal mask, and threads of Swift's executors and
    /// of Dispatch block most signals: a child started from there could never be stopped with
    /// SIGTERM. Spawning with an empty mask gives every child ordinary signal handling.
    public static func spawnWithDefaultSignalMask<T>(_ body: () throws -> T) rethrows -> T {
        var empty = sigset_t(), old = sigset_t()
        sigemptyset(&empty)
        pthread_sigmask(SIG_SETMASK, &empty, &old)
        defer { pthread_sigmask(SIG_SETMASK, &old, nil) }
        return try body()
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
