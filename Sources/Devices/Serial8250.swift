import MicroVMCore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Where console bytes go. Called with the device's lock held, so output from several vCPUs
/// stays in order; a sink must not call back into the device that feeds it.
public typealias OutputSink = @Sendable ([UInt8]) -> Void

public enum OutputSinks {
    /// Drops everything.
    public static let discard: OutputSink = { _ in }

    /// Writes to the process's standard output, unbuffered.
    public static let standardOutput: OutputSink = { bytes in writeAll(bytes, to: STDOUT_FILENO) }

    /// Writes to an open file descriptor (a console log), whole chunks, unbuffered.
    public static func file(descriptor fd: Int32) -> OutputSink { { bytes in writeAll(bytes, to: fd) } }

    /// Sends every chunk to each sink in turn (e.g. the terminal and a ConsoleParser feeder).
    public static func tee(_ sinks: OutputSink...) -> OutputSink {
        { bytes in for s in sinks { s(bytes) } }
    }

    /// Writes as much as the descriptor takes; returns how many bytes went out.
    @discardableResult
    public static func writeAll(_ bytes: [UInt8], to fd: Int32) -> Int {
        bytes.withUnsafeBytes { buf in
            var done = 0
            while done < buf.count {
                // SAFETY: baseAddress is non-nil for a non-empty buffer; done < count keeps it in range.
                let n = Glibc.write(fd, buf.baseAddress! + done, buf.count - done)
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }  // a closed terminal or a full disk must not stop the guest
                done += n
            }
            return done
        }
    }
}

/// A console log that never grows past `limit` bytes: when the next chunk would pass it, the
/// file's content moves to `PATH.1` (replacing the one before) and the file starts over, so
/// the newest output is always kept and at most twice the limit is on disk, whatever the guest
/// prints. Both files are opened once, here, and the move copies and truncates in place: no
/// path is used after this, so a jailed VMM (no host file system in sight) keeps rotating, and
/// a reader holding the log open sees it shrink rather than lose it to a rename. A failed
/// write is counted, never fatal: the guest does not stop for its log.
public final class RotatingLog: Sendable {
    public static let defaultLimit = 8 << 20

    struct State { var fd: Int32; var previous: Int32; var size: Int; var rotations = 0; var failures = 0 }
    private let state: Mutex<State>
    public let path: String
    public let limit: Int

    public init(path: String, limit: Int = RotatingLog.defaultLimit) throws {
        let fd = Glibc.open(path, O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw SystemCallError("open \(path)", errno: errno) }
        var st = stat()
        let known = fstat(fd, &st) == 0
        // Only a regular file starts over: /dev/null or a pipe is written as it is.
        var previous: Int32 = -1
        if known && st.st_mode & S_IFMT == S_IFREG {
            previous = Glibc.open(path + ".1", O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
            guard previous >= 0 else {
                let e = errno
                _ = Glibc.close(fd)
                throw SystemCallError("open \(path).1", errno: e)
            }
        }
        self.path = path; self.limit = max(4096, limit)
        state = Mutex(State(fd: fd, previous: previous, size: known ? Int(st.st_size) : 0))
    }

    deinit {
        state.withLock {
            _ = Glibc.close($0.fd)
            if $0.previous >= 0 { _ = Glibc.close($0.previous) }
        }
    }

    public var sink: OutputSink { { [self] bytes in write(bytes) } }

    public func write(_ bytes: [UInt8]) {
        state.withLock { s in
            if s.previous >= 0, s.size > 0, s.size + bytes.count > limit {
                Self.move(from: s.fd, to: s.previous, size: s.size)
                s.size = 0
                s.rotations += 1
            }
            let written = OutputSinks.writeAll(bytes, to: s.fd)
            s.size += written
            if written < bytes.count { s.failures += 1 }
        }
    }

    /// Replaces `to`'s content with `from`'s first `size` bytes, then empties `from` (whose
    /// O_APPEND writes then start at 0).
    static func move(from: Int32, to: Int32, size: Int) {
        _ = ftruncate(to, 0)
        var buf = [UInt8](repeating: 0, count: 64 << 10)
        var offset = 0
        while offset < size {
            let n = buf.withUnsafeMutableBytes { pread(from, $0.baseAddress, min($0.count, size - offset), off_t(offset)) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            let w = buf.withUnsafeBytes { pwrite(to, $0.baseAddress, n, off_t(offset)) }
            if w != n { break }
            offset += n
        }
        _ = ftruncate(from, 0)
    }

    /// How many times the log started over, and how many writes failed.
    public var rotations: Int { state.withLock { $0.rotations } }
    public var failures: Int { state.withLock { $0.failures } }
}

/// Collects console output in memory and gives back the newest `limit` bytes. It holds up to
/// twice that between trims, so a flood costs one copy per `limit` bytes, not one per chunk.
public final class ConsoleRecorder: Sendable {
    private let buffer = Mutex<[UInt8]>([])
    public let limit: Int
    public init(limit: Int = 1 << 20) { self.limit = limit }

    public var sink: OutputSink {
        { [self] bytes in
            buffer.withLock { b in
                b += bytes
                if b.count > 2 * limit { b.removeFirst(b.count - limit) }
            }
        }
    }

    public var bytes: [UInt8] { buffer.withLock { Array($0.suffix(limit)) } }
    public var text: String { String(decoding: bytes, as: UTF8.self) }
}

/// A 16550A UART as Linux's 8250 driver sees it at COM1 (port 0x3f8, IRQ 4): the full register
/// file with the divisor latch, FIFO identification in IIR bits 6-7, loopback, THRE and
/// received-data interrupts, and a bounded receive FIFO for the console's input.
///
/// Transmission is instant: a byte written to THR goes to the sink at once, so THR and the
/// shift register are always empty (LSR THRE|TEMT). Interrupts follow the 16550: THRE is
/// raised when THR empties or when IER's THRE bit goes from 0 to 1, and cleared by reading IIR
/// (when it is the reported source) or writing THR. The line is edge-triggered: `trigger()`
/// fires when the UART goes from no pending interrupt to one; Linux's handler loops on IIR
/// until nothing is pending, so one edge per burst is enough.
public final class Serial8250: BusDevice {
    /// Register offsets from the base port.
    public enum Register {
        public static let data = 0       // RBR (read) / THR (write); DLL with DLAB
        public static let ier = 1        // DLM with DLAB
        public static let iir = 2        // IIR (read) / FCR (write)
        public static let lcr = 3
        public static let mcr = 4
        public static let lsr = 5
        public static let msr = 6
        public static let scr = 7
    }
    public static let registerCount: UInt64 = 8

    public struct Statistics: Sendable, Equatable {
        public var transmitted = 0
        public var received = 0
        /// Bytes lost because the receive FIFO was full (loopback writes).
        public var overruns = 0
    }

    struct State {
        var ier: UInt8 = 0
        var lcr: UInt8 = 0
        var mcr: UInt8 = 0
        var scr: UInt8 = 0
        var dll: UInt8 = 0x0c  // 9600 baud from the 1.8432 MHz clock
        var dlm: UInt8 = 0
        var fifoEnabled = false
        var overrun = false
        var msrDelta: UInt8 = 0
        var thrPending = false
        var rx: [UInt8]
        var rxHead = 0
        var rxCount = 0
        var stats = Statistics()

        init(capacity: Int) { rx = [UInt8](repeating: 0, count: capacity) }

        var dlab: Bool { lcr & 0x80 != 0 }
        var loop: Bool { mcr & 0x10 != 0 }

        /// IIR's interrupt id (bits 0-3) for the highest-priority pending source; 0x01 = none.
        var interruptID: UInt8 {
            if ier & 0x04 != 0 && overrun { return 0x06 }
            if ier & 0x01 != 0 && rxCount > 0 { return 0x04 }
            if ier & 0x02 != 0 && thrPending { return 0x02 }
            if ier & 0x08 != 0 && msrDelta != 0 { return 0x00 }
            return 0x01
        }
        var pending: Bool { interruptID != 0x01 }

        /// Modem status lines: in loopback they follow MCR (DTR→DSR, RTS→CTS, OUT1→RI,
        /// OUT2→DCD); otherwise a connected, ready terminal (CTS, DSR, DCD).
        var modemLines: UInt8 {
            guard loop else { return 0xb0 }
            var v: UInt8 = 0
            if mcr & 0x01 != 0 { v |= 0x20 }
            if mcr & 0x02 != 0 { v |= 0x10 }
            if mcr & 0x04 != 0 { v |= 0x40 }
            if mcr & 0x08 != 0 { v |= 0x80 }
            return v
        }

        @discardableResult
        mutating func push(_ b: UInt8) -> Bool {
            guard rxCount < rx.count else { return false }
            rx[(rxHead + rxCount) % rx.count] = b
            rxCount += 1
            return true
        }

        mutating func pop() -> UInt8 {
            guard rxCount > 0 else { return 0 }
            let b = rx[rxHead]
            rxHead = (rxHead + 1) % rx.count
            rxCount -= 1
            return b
        }

        mutating func clearRx() { rxHead = 0; rxCount = 0 }

        mutating func read(_ reg: UInt64) -> UInt8 {
            switch reg {
            case 0:
                return dlab ? dll : pop()
            case 1:
                return dlab ? dlm : ier
            case 2:
                let id = interruptID
                if id == 0x02 { thrPending = false }
                return id | (fifoEnabled ? 0xc0 : 0)
            case 3: return lcr
            case 4: return mcr
            case 5:
                var v: UInt8 = 0x60  // THRE | TEMT: transmission is instant
                if rxCount > 0 { v |= 0x01 }
                if overrun { v |= 0x02 }
                overrun = false
                return v
            case 6:
                let v = modemLines | msrDelta
                msrDelta = 0
                return v
            case 7: return scr
            default: return 0
            }
        }

        mutating func write(_ reg: UInt64, _ v: UInt8, out: inout [UInt8]) {
            switch reg {
            case 0 where dlab:
                dll = v
            case 0:
                if loop {
                    if push(v) { stats.received += 1 } else { overrun = true; stats.overruns += 1 }
                } else {
                    out.append(v)
                    stats.transmitted += 1
                }
                thrPending = true
            case 1 where dlab:
                dlm = v
            case 1:
                let old = ier
                ier = v & 0x0f  // 16550A has no IER bits 4-7 (Linux's XScale probe checks bit 6)
                if ier & 0x02 != 0 && old & 0x02 == 0 { thrPending = true }
                if ier & 0x02 == 0 { thrPending = false }
            case 2:
                let enable = v & 0x01 != 0
                if enable != fifoEnabled || v & 0x02 != 0 { clearRx() }
                fifoEnabled = enable
            case 3:
                lcr = v
            case 4:
                let before = modemLines
                mcr = v & 0x1f
                let after = modemLines
                // Delta bits: CTS, DSR changed; RI trailing edge; DCD changed.
                let changed = before ^ after
                if changed & 0x10 != 0 { msrDelta |= 0x01 }
                if changed & 0x20 != 0 { msrDelta |= 0x02 }
                if before & 0x40 != 0 && after & 0x40 == 0 { msrDelta |= 0x04 }
                if changed & 0x80 != 0 { msrDelta |= 0x08 }
            case 7:
                scr = v
            default:
                break  // LSR and MSR writes are factory-test only
            }
        }
    }

    private let state: Mutex<State>
    private let interrupt: any InterruptLine
    private let sink: OutputSink

    /// - Parameters:
    ///   - interrupt: the UART's IRQ (COM1: 4), edge-triggered.
    ///   - output: where transmitted bytes go.
    ///   - receiveCapacity: receive FIFO size; input beyond it is refused until the guest reads.
    public init(interrupt: any InterruptLine, output: @escaping OutputSink, receiveCapacity: Int = 64) {
        self.state = Mutex(State(capacity: max(1, receiveCapacity)))
        self.interrupt = interrupt
        self.sink = output
    }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        let fire = state.withLock { s -> Bool in
            let before = s.pending
            // A wider access reads consecutive registers, as an 8-bit device on a wider bus would.
            for i in 0..<data.count {
                let (reg, o) = offset.addingReportingOverflow(UInt64(i))
                data[i] = o ? 0 : s.read(reg)
            }
            return !before && s.pending
        }
        if fire { interrupt.trigger() }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        let fire = state.withLock { s -> Bool in
            let before = s.pending
            var out: [UInt8] = []
            for i in 0..<data.count {
                let (reg, o) = offset.addingReportingOverflow(UInt64(i))
                if !o { s.write(reg, data[i], out: &out) }
            }
            if !out.isEmpty { sink(out) }
            return !before && s.pending
        }
        if fire { interrupt.trigger() }
    }

    /// Queues console input for the guest (e.g. from stdin). Returns how many bytes were taken:
    /// the FIFO is bounded, and in loopback mode the line is disconnected, so the caller keeps
    /// the rest and offers it again later.
    @discardableResult
    public func enqueueInput(_ bytes: some Collection<UInt8>) -> Int {
        let (taken, fire) = state.withLock { s -> (Int, Bool) in
            guard !s.loop else { return (0, false) }
            let before = s.pending
            var n = 0
            for b in bytes {
                guard s.push(b) else { break }
                n += 1
            }
            s.stats.received += n
            return (n, !before && s.pending)
        }
        if fire { interrupt.trigger() }
        return taken
    }

    /// Free space in the receive FIFO.
    public var inputSpace: Int { state.withLock { $0.rx.count - $0.rxCount } }

    public var statistics: Statistics { state.withLock { $0.stats } }

    /// The baud rate divisor the guest programmed (DLM:DLL).
    public var divisor: UInt16 { state.withLock { UInt16($0.dlm) << 8 | UInt16($0.dll) } }
}
