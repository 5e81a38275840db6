import Foundation
import MicroVMCore

/// Reads a container's stdout and stderr to the end on their own threads, appends both to the
/// instance log as they arrive (so `mvm logs` works mid-run), and notes when the start marker
/// the wrapped command prints first came in: that moment is the command's first instruction.
final class OutputCollector: @unchecked Sendable {
    static let marker = Data("@@mvm:container-started@@\n".utf8)

    private let lock = NSLock()
    private var out = Data()
    private var err = Data()
    private var markerAt: Double?
    private let expectMarker: Bool
    private let log: FileHandle?
    private let group = DispatchGroup()
    private let onStart: (@Sendable () -> Void)?

    /// `onStart` runs once, on a thread of its own, when the start marker arrives.
    init(stdout: FileHandle, stderr: FileHandle, logPath: String?, expectMarker: Bool, onStart: (@Sendable () -> Void)? = nil) {
        self.expectMarker = expectMarker
        self.onStart = onStart
        if let logPath {
            // Created (or emptied) directly: FileManager.createFile writes a temporary and syncs it.
            let fd = open(logPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            log = fd >= 0 ? FileHandle(fileDescriptor: fd, closeOnDealloc: true) : nil
        } else {
            log = nil
        }
        pump(stdout, isStdout: true)
        pump(stderr, isStdout: false)
    }

    private func pump(_ h: FileHandle, isStdout: Bool) {
        group.enter()
        Thread.detachNewThread { [self] in
            while true {
                let chunk = h.availableData
                if chunk.isEmpty { break }
                let now = Monotonic.seconds()
                lock.lock()
                if isStdout {
                    out.append(chunk)
                    if expectMarker, markerAt == nil, out.starts(with: Self.marker) {
                        markerAt = now
                        if let onStart { Thread.detachNewThread(onStart) }
                    }
                } else {
                    err.append(chunk)
                }
                // Output beyond what a run may reasonably print is dropped from memory, not the log.
                if out.count > 64 << 20 { out.removeSubrange(Self.marker.count..<(out.count - (32 << 20))) }
                if err.count > 64 << 20 { err.removeSubrange(0..<(err.count - (32 << 20))) }
                try? log?.write(contentsOf: chunk)
                lock.unlock()
            }
            try? h.close()
            group.leave()
        }
    }

    /// Waits for both streams to end (every holder of the write ends has exited).
    func finish(timeout: Double) -> Bool {
        let ok = group.wait(timeout: .now() + timeout) == .success
        lock.lock(); defer { lock.unlock() }
        try? log?.close()
        return ok
    }

    /// CLOCK_MONOTONIC seconds when the start marker arrived.
    var startedAt: Double? { lock.lock(); defer { lock.unlock() }; return markerAt }

    /// stdout without the marker line, then stderr.
    var result: (stdout: String, stderr: String, sawMarker: Bool) {
        lock.lock(); defer { lock.unlock() }
        var o = out
        let saw = out.starts(with: Self.marker)
        if saw { o.removeFirst(Self.marker.count) }
        return (String(decoding: o, as: UTF8.self), String(decoding: err, as: UTF8.self), saw)
    }
}

/// A runtime command run in the foreground with its output streamed into a collector.
struct StreamedRun {
    var status: Int32
    var collector: OutputCollector
    var timedOut: Bool

    /// Launches `executable`, kills through `onTimeout` after `timeout` seconds, and returns once
    /// the command has exited (a signal is reported the shell's way, 128 + signal).
    /// `clock` gets `spawned` once the runtime process exists; the caller marks the rest.
    /// `cancelled` is asked once the runtime exists: a cancellation that came before it (while
    /// the bundle or network was made) then kills the container through `onTimeout`.
    /// `onStart` runs once the command's start marker arrives (the container runs).
    static func run(executable: String, arguments: [String], logPath: String?, expectMarker: Bool, timeout: Double, clock: LaunchClock,
                    cancelled: @escaping @Sendable () -> Bool = { false }, onStart: (@Sendable () -> Void)? = nil,
                    onTimeout: @escaping @Sendable () -> Void) throws -> StreamedRun {
        let outPipe = try ProcessRunner.makePipe(), errPipe = try ProcessRunner.makePipe()
        let child: ChildProcess
        do {
            child = try ChildProcess([executable] + arguments, stdout: .descriptor(outPipe.write), stderr: .descriptor(errPipe.write))
        } catch {
            for fd in [outPipe.read, outPipe.write, errPipe.read, errPipe.write] { close(fd) }
            throw MicroVMError(.backend, "cannot launch '\(executable)': check that it is installed and executable", cause: error)
        }
        clock.mark(.spawned)
        // Only the child may hold the write ends, or the readers never see the end of the stream.
        close(outPipe.write); close(errPipe.write)
        let collector = OutputCollector(stdout: FileHandle(fileDescriptor: outPipe.read, closeOnDealloc: true),
                                        stderr: FileHandle(fileDescriptor: errPipe.read, closeOnDealloc: true),
                                        logPath: logPath, expectMarker: expectMarker, onStart: onStart)
        var timedOut = false
        var status: Int32
        if cancelled() {
            // Give the runtime a moment to name the container, then kill it.
            _ = child.wait(upTo: 0.2)
            onTimeout()
        }
        if let s = child.wait(upTo: max(0.1, timeout)) {
            status = s
        } else {
            // The runtime's own kill first (it reaches the container's processes); the runtime
            // process itself is killed if it has not gone a few seconds later.
            timedOut = true
            onTimeout()
            status = child.wait(timeout: 10).status
        }
        return StreamedRun(status: status, collector: collector, timedOut: timedOut)
    }
}
