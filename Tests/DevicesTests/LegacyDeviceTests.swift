import Foundation
import Testing
import Synchronization
import MicroVMCore
@testable import Devices

/// Counts edges and records level changes, as the VMM's KVM_IRQ_LINE wiring would see them.
final class CountingLine: InterruptLine {
    let edges = Atomic<Int>(0)
    let level = Atomic<Bool>(false)
    func trigger() { edges.add(1, ordering: .relaxed) }
    func set(level: Bool) { self.level.store(level, ordering: .relaxed) }
    var count: Int { edges.load(ordering: .relaxed) }
}

/// A UART on an IOBus at COM1, driven like Linux's 8250 driver drives it.
struct UARTRig {
    let bus = IOBus()
    let line = CountingLine()
    let console = ConsoleRecorder()
    let uart: Serial8250
    static let base: UInt64 = 0x3f8

    init(capacity: Int = 64) throws {
        uart = Serial8250(interrupt: line, output: console.sink, receiveCapacity: capacity)
        try bus.insert(uart, at: Self.base, length: Serial8250.registerCount)
    }

    func inb(_ reg: Int) -> UInt8 { bus.read(address: Self.base + UInt64(reg), count: 1)[0] }
    func outb(_ reg: Int, _ v: UInt8) { bus.write(address: Self.base + UInt64(reg), bytes: [v]) }
}

@Suite("16550A UART")
struct Serial8250Tests {
    typealias R = Serial8250.Register

    @Test("Linux's autoconfig identifies a 16550A: IER test, loopback MSR test, FIFO bits, no EFR/XScale")
    func autoconfig() throws {
        let u = try UARTRig()
        // IER existence test (serial8250 autoconfig).
        let saved = u.inb(R.ier)
        u.outb(R.ier, 0)
        #expect(u.inb(R.ier) & 0x0f == 0)
        u.outb(R.ier, 0x0f)
        #expect(u.inb(R.ier) & 0x0f == 0x0f)
        u.outb(R.ier, saved)
        // Loopback test: MCR = LOOP | OUT2 | RTS must read back DCD | CTS in MSR.
        let mcr = u.inb(R.mcr)
        u.outb(R.mcr, 0x10 | 0x0a)
        #expect(u.inb(R.msr) & 0xf0 == 0x90)
        u.outb(R.mcr, mcr)
        // FIFO detection: IIR bits 6-7 are 0 with the FIFO off and 0b11 once FCR enables it.
        #expect(u.inb(R.iir) >> 6 == 0)
        u.outb(R.lcr, 0xbf)
        u.outb(R.iir, 0)  // EFR write on a 16650; an FCR write here
        u.outb(R.lcr, 0)
        u.outb(R.iir, 0x01)
        #expect(u.inb(R.iir) >> 6 == 0b11)
        // 16550A variant probes must fail: IIR read under DLAB is not 0 (no EFR) ...
        u.outb(R.lcr, 0x80)
        #expect(u.inb(R.iir) != 0)
        u.outb(R.lcr, 0)
        // ... no 64-byte FIFO bit (TI16750) ...
        u.outb(R.iir, 0x21)
        #expect(u.inb(R.iir) & 0x20 == 0)
        // ... and IER bit 6 does not stick (XScale).
        u.outb(R.ier, 0x40)
        #expect(u.inb(R.ier) & 0x40 == 0)
        // Scratch register holds values.
        for v: UInt8 in [0x00, 0x55, 0xaa, 0xff] {
            u.outb(R.scr, v)
            #expect(u.inb(R.scr) == v)
        }
        // LSR is never 0xff (the driver's "LSR safety check").
        #expect(u.inb(R.lsr) == 0x60)
    }

    @Test("DLAB selects the divisor latch; clearing it restores THR and IER")
    func divisorLatch() throws {
        let u = try UARTRig()
        u.outb(R.ier, 0)
        u.outb(R.lcr, 0x80)
        u.outb(R.data, 0x01)  // DLL: 115200 baud
        u.outb(R.ier, 0x00)   // DLM
        #expect(u.inb(R.data) == 0x01)
        u.outb(R.lcr, 0x03)   // 8N1, DLAB off
        #expect(u.uart.divisor == 1)
        #expect(u.inb(R.lcr) == 0x03)
        #expect(u.console.bytes.isEmpty, "divisor writes must not transmit")
        u.outb(R.data, UInt8(ascii: "A"))
        #expect(u.console.text == "A")
        #expect(u.inb(R.ier) == 0)
    }

    @Test("THRE interrupt: raised when IER enables it, cleared by reading IIR, re-raised on toggle (Linux's THRE test)")
    func threInterrupt() throws {
        let u = try UARTRig()
        u.outb(R.iir, 0x07)  // FIFO on, cleared
        #expect(u.inb(R.iir) == 0xc1, "nothing pending")
        u.outb(R.ier, 0x02)
        #expect(u.line.count == 1)
        let iir1 = u.inb(R.iir)
        #expect(iir1 == 0xc2, "THRE pending")
        #expect(u.inb(R.iir) == 0xc1, "reading IIR cleared THRE")
        u.outb(R.ier, 0)
        u.outb(R.ier, 0x02)
        let iir = u.inb(R.iir)
        #expect(iir & 0x01 == 0, "THRE re-asserted when the interrupt is enabled again")
        #expect(u.line.count == 2)
        // Transmitting re-arms THRE: one edge per burst, not per byte.
        _ = u.inb(R.iir)
        for b in Array("hello".utf8) { u.outb(R.data, b) }
        #expect(u.console.text == "hello")
        #expect(u.line.count == 3)
        #expect(u.inb(R.iir) == 0xc2)
        u.outb(R.ier, 0)
        #expect(u.inb(R.iir) == 0xc1)
        #expect(u.uart.statistics.transmitted == 5)
    }

    @Test("input raises the RX interrupt, LSR shows data ready, RBR drains it in order")
    func receive() throws {
        let u = try UARTRig()
        u.outb(R.iir, 0x01)
        u.outb(R.ier, 0x01)
        #expect(u.line.count == 0)
        #expect(u.uart.enqueueInput(Array("ls\n".utf8)) == 3)
        #expect(u.line.count == 1)
        #expect(u.inb(R.iir) == 0xc4)
        #expect(u.inb(R.lsr) & 0x01 == 1)
        var got: [UInt8] = []
        while u.inb(R.lsr) & 0x01 == 1 { got.append(u.inb(R.data)) }
        #expect(got == Array("ls\n".utf8))
        #expect(u.inb(R.iir) == 0xc1)
        #expect(u.inb(R.data) == 0, "an empty FIFO reads as 0")
        // More input after draining is a new edge.
        u.uart.enqueueInput([0x41])
        #expect(u.line.count == 2)
        // RX outranks THRE in IIR.
        u.outb(R.ier, 0x03)
        #expect(u.inb(R.iir) == 0xc4)
    }

    @Test("the receive FIFO is bounded and FCR clears it")
    func boundedFIFO() throws {
        let u = try UARTRig(capacity: 16)
        #expect(u.uart.enqueueInput([UInt8](repeating: 0x61, count: 100)) == 16)
        #expect(u.uart.inputSpace == 0)
        #expect(u.uart.enqueueInput([0x62]) == 0)
        u.outb(R.iir, 0x03)  // enable + clear RX
        #expect(u.inb(R.lsr) & 0x01 == 0)
        #expect(u.uart.inputSpace == 16)
    }

    @Test("loopback: THR feeds RBR, nothing reaches the console, overruns set LSR OE")
    func loopback() throws {
        let u = try UARTRig(capacity: 4)
        u.outb(R.mcr, 0x10)
        for b: UInt8 in [1, 2, 3, 4, 5] { u.outb(R.data, b) }
        #expect(u.console.bytes.isEmpty)
        #expect(u.uart.enqueueInput([9]) == 0, "the line is disconnected in loopback")
        let lsr = u.inb(R.lsr)
        #expect(lsr & 0x03 == 0x03, "data ready and overrun")
        #expect(u.inb(R.lsr) & 0x02 == 0, "reading LSR clears OE")
        #expect([u.inb(R.data), u.inb(R.data), u.inb(R.data), u.inb(R.data)] == [1, 2, 3, 4])
        #expect(u.uart.statistics.overruns == 1)
        // Modem status deltas follow MCR changes in loopback.
        _ = u.inb(R.msr)  // entering loopback changed the lines; clear those deltas
        u.outb(R.mcr, 0x10 | 0x02)
        #expect(u.inb(R.msr) == 0x11, "CTS and delta-CTS")
        #expect(u.inb(R.msr) == 0x10, "reading MSR clears deltas")
        u.outb(R.mcr, 0)
        #expect(u.inb(R.msr) & 0xf0 == 0xb0)
    }

    @Test("hostile accesses: every offset × every value, any size, never trap")
    func hostile() throws {
        let u = try UARTRig(capacity: 8)
        for off in 0..<16 {
            for v in 0...255 {
                u.bus.write(address: UARTRig.base + UInt64(off), bytes: [UInt8(v)])
                _ = u.bus.read(address: UARTRig.base + UInt64(off), count: 1)
            }
        }
        var x: UInt64 = 0x1234_5678
        for _ in 0..<5000 {
            x = x &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            let size = [1, 2, 4, 8][Int(x >> 60) & 3]
            let off = (x >> 32) % 12
            let bytes = (0..<size).map { UInt8(truncatingIfNeeded: x >> (8 * UInt64($0))) }
            bytes.withUnsafeBytes { u.uart.write(offset: off, data: $0) }
            var out = [UInt8](repeating: 0, count: size)
            out.withUnsafeMutableBytes { u.uart.read(offset: UInt64.max - off, data: $0) }
            out.withUnsafeMutableBytes { u.uart.read(offset: off, data: $0) }
            _ = u.uart.enqueueInput(bytes)
        }
        #expect(u.uart.inputSpace >= 0 && u.uart.inputSpace <= 8)
    }
}

@Suite("i8042")
struct I8042Tests {
    final class Resets: Sendable {
        let n = Atomic<Int>(0)
        var count: Int { n.load(ordering: .relaxed) }
    }

    func rig() throws -> (IOBus, I8042, Resets) {
        let r = Resets()
        let dev = I8042 { r.n.add(1, ordering: .relaxed) }
        let bus = IOBus()
        try bus.insert(dev, at: 0x60, length: I8042.length)
        return (bus, dev, r)
    }

    @Test("Ctrl-Alt-Del: the scancodes in order on IRQ 1, an edge per byte, even behind a stale byte")
    func ctrlAltDel() throws {
        let line = CountingLine()
        let dev = I8042(keyboardInterrupt: line) {}
        let bus = IOBus()
        try bus.insert(dev, at: 0x60, length: I8042.length)
        // A byte the driver never read (a self-test answer) is waiting: the keys still interrupt.
        bus.write(address: 0x64, bytes: [0xaa])
        let before = line.count
        dev.pressCtrlAltDel()
        #expect(line.count == before + 1)
        #expect(bus.read(address: 0x60, count: 1)[0] == 0x55)
        var codes: [UInt8] = []
        while bus.read(address: 0x64, count: 1)[0] & 0x01 != 0 { codes.append(bus.read(address: 0x60, count: 1)[0]) }
        #expect(codes == I8042.ctrlAltDel)
        // One more edge for each byte left after a read.
        #expect(line.count == before + 1 + I8042.ctrlAltDel.count)
        // With the keyboard interrupt off in the config byte, the keys wait silently.
        bus.write(address: 0x64, bytes: [0x60])
        bus.write(address: 0x60, bytes: [0x44])
        let quiet = line.count
        dev.pressCtrlAltDel()
        #expect(line.count == quiet)
        // Turning it back on delivers what waited.
        bus.write(address: 0x64, bytes: [0x60])
        bus.write(address: 0x60, bytes: [0x45])
        #expect(line.count == quiet + 1)
        #expect(bus.read(address: 0x60, count: 1)[0] == 0x1d)
    }

    @Test("0xFE on port 0x64 resets (Linux reboot=k), once per command")
    func reset() throws {
        let (bus, dev, r) = try rig()
        // Linux's kb_wait: the input buffer must read empty before each command.
        #expect(bus.read(address: 0x64, count: 1)[0] & 0x02 == 0)
        bus.write(address: 0x64, bytes: [0xfe])
        #expect(r.count == 1)
        #expect(dev.resetCount == 1)
        bus.write(address: 0x64, bytes: [0xff])  // pulses no line
        #expect(r.count == 1)
        // Writing the output port with bit 0 low also resets.
        bus.write(address: 0x64, bytes: [0xd1])
        bus.write(address: 0x60, bytes: [0xfe])
        #expect(r.count == 2)
    }

    @Test("self-test, config byte read/write, status OBF")
    func probe() throws {
        let (bus, _, r) = try rig()
        let status = bus.read(address: 0x64, count: 1)[0]
        #expect(status != 0xff && status & 0x01 == 0 && status & 0x04 != 0)
        bus.write(address: 0x64, bytes: [0xaa])
        #expect(bus.read(address: 0x64, count: 1)[0] & 0x01 == 1)
        #expect(bus.read(address: 0x60, count: 1)[0] == 0x55)
        #expect(bus.read(address: 0x64, count: 1)[0] & 0x01 == 0)
        bus.write(address: 0x64, bytes: [0x60])
        bus.write(address: 0x60, bytes: [0x30])
        bus.write(address: 0x64, bytes: [0x20])
        #expect(bus.read(address: 0x60, count: 1)[0] == 0x30)
        bus.write(address: 0x64, bytes: [0xa8])
        bus.write(address: 0x64, bytes: [0x20])
        #expect(bus.read(address: 0x60, count: 1)[0] == 0x10, "enable aux clears the aux-disable bit")
        #expect(bus.read(address: 0x61, count: 1)[0] & 0x20 != 0)
        #expect(r.count == 0)
    }

    @Test("hostile writes never trap and only reset commands reset")
    func hostile() throws {
        let (bus, dev, r) = try rig()
        var expected = 0
        for off in 0..<5 {
            for v in 0...255 {
                // Every 0xF0-0xFF command with bit 0 clear pulses reset.
                if off == 4 && v >= 0xf0 && v & 1 == 0 { expected += 1 }
                bus.write(address: 0x60 + UInt64(off), bytes: [UInt8(v)])
                bus.write(address: 0x60 + UInt64(off), bytes: [])
                _ = bus.read(address: 0x60 + UInt64(off), count: 4)
            }
        }
        // Data bytes written after a 0xD1 (write output port) can also reset; count those too.
        #expect(r.count >= expected)
        #expect(dev.resetCount == r.count)
    }
}

@Suite("boot timer")
struct BootTimerTests {
    final class Clock: Sendable {
        let offsetNanos = Atomic<Int64>(0)
        let start = ContinuousClock.now
        var now: ContinuousClock.Instant { start + .nanoseconds(offsetNanos.load(ordering: .relaxed)) }
    }

    @Test("123 at port 0x440 records the time since start, once; other values are counted")
    func records() throws {
        let clock = Clock()
        let calls = Mutex<[Duration]>([])
        let timer = BootTimer(start: clock.start, now: { clock.now }) { d in calls.withLock { $0.append(d) } }
        let bus = IOBus()
        try bus.insert(timer, at: UInt64(GuestProtocol.bootTimerPort), length: 1)
        clock.offsetNanos.store(1_500_000_000, ordering: .relaxed)
        bus.write(address: 0x440, bytes: [7])
        bus.write(address: 0x440, bytes: [123, 0])
        #expect(timer.bootTime == nil)
        #expect(timer.ignoredCount == 2)
        bus.write(address: 0x440, bytes: [GuestProtocol.bootTimerValue])
        #expect(timer.bootTime == .milliseconds(1500))
        clock.offsetNanos.store(9_000_000_000, ordering: .relaxed)
        bus.write(address: 0x440, bytes: [123])
        #expect(timer.bootTime == .milliseconds(1500), "the first signal is the boot time")
        #expect(timer.signalCount == 2)
        #expect(calls.withLock { $0 } == [.milliseconds(1500)])
        #expect(bus.read(address: 0x440, count: 1) == [0])
    }

    @Test("with the real clock the boot time is non-negative")
    func realClock() {
        let timer = BootTimer(start: .now)
        [UInt8(123)].withUnsafeBytes { timer.write(offset: 0, data: $0) }
        #expect(timer.bootTime.map { $0 >= .zero } == true)
    }
}

@Suite("CMOS clock")
struct CMOSClockTests {
    func rig(_ epoch: Int64) throws -> (IOBus, CMOSClock) {
        let dev = CMOSClock(now: { epoch })
        let bus = IOBus()
        try bus.insert(dev, at: 0x70, length: CMOSClock.length)
        return (bus, dev)
    }

    func cmos(_ bus: IOBus, _ index: UInt8) -> UInt8 {
        bus.write(address: 0x70, bytes: [index | 0x80])  // Linux sets the NMI-disable bit too
        return bus.read(address: 0x71, count: 1)[0]
    }

    @Test("time registers read the host's UTC time in BCD, UIP clear")
    func bcd() throws {
        // 2026-11-27 06:05:09 UTC, a Friday.
        let (bus, _) = try rig(1_795_759_509)
        #expect(cmos(bus, 0x0a) & 0x80 == 0)
        #expect(cmos(bus, 0x0d) == 0x80)
        #expect([cmos(bus, 0x00), cmos(bus, 0x02), cmos(bus, 0x04)] == [0x09, 0x05, 0x06])
        #expect([cmos(bus, 0x07), cmos(bus, 0x08), cmos(bus, 0x09), cmos(bus, 0x32)] == [0x27, 0x11, 0x26, 0x20])
        #expect(cmos(bus, 0x06) == 6)
    }

    @Test("binary and 12-hour modes follow status B; NVRAM stores, the clock ignores writes")
    func modes() throws {
        let (bus, _) = try rig(1_795_759_509 + 8 * 3600)  // 14:05:09
        bus.write(address: 0x70, bytes: [0x0b])
        bus.write(address: 0x71, bytes: [0x04])  // binary, 12-hour
        #expect(cmos(bus, 0x04) == 0x80 | 2)
        #expect(cmos(bus, 0x07) == 27)
        bus.write(address: 0x70, bytes: [0x00])
        bus.write(address: 0x71, bytes: [0x33])
        #expect(cmos(bus, 0x00) == 9)
        bus.write(address: 0x70, bytes: [0x40])
        bus.write(address: 0x71, bytes: [0xab])
        #expect(cmos(bus, 0x40) == 0xab)
        for i in 0...255 {
            bus.write(address: 0x70, bytes: [UInt8(i)])
            bus.write(address: 0x71, bytes: [UInt8(255 - i)])
            _ = bus.read(address: 0x71, count: 8)
        }
    }
}

@Suite("console log")
struct RotatingLogTests {
    @Test("starts over past its limit, keeps the previous file, and loses none of the newest output")
    func rotatesAndKeepsTheNewest() throws {
        let dir = FileManager.default.temporaryDirectory.path + "/mvm-log-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/console.log"
        let log = try RotatingLog(path: path, limit: 8192)
        var written: [UInt8] = []
        for i in 0..<40 {
            let chunk = [UInt8](repeating: UInt8(65 + i % 26), count: 1000)
            log.sink(chunk)
            written += chunk
        }
        let current = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        let previous = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path + ".1")))
        #expect(current.count <= 8192 && previous.count <= 8192, "\(current.count) and \(previous.count) bytes")
        #expect(log.rotations == 4 && log.failures == 0)
        // The two files are the newest output, whole and in order.
        #expect(Array(written.suffix(previous.count + current.count)) == previous + current)
        #expect(!FileManager.default.fileExists(atPath: path + ".2"))
    }

    @Test("starts over without its path: the directory moved away (as from a jailed VMM) changes nothing")
    func rotatesThroughItsDescriptors() throws {
        let base = FileManager.default.temporaryDirectory.path + "/mvm-log-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: base + "/a", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: base) }
        let log = try RotatingLog(path: base + "/a/console.log", limit: 4096)
        try FileManager.default.moveItem(atPath: base + "/a", toPath: base + "/b")
        for i in 0..<10 { log.sink([UInt8](repeating: UInt8(48 + i), count: 1000)) }
        let current = try [UInt8](Data(contentsOf: URL(fileURLWithPath: base + "/b/console.log")))
        let previous = try [UInt8](Data(contentsOf: URL(fileURLWithPath: base + "/b/console.log.1")))
        #expect(log.rotations == 2 && log.failures == 0)
        #expect(current == [UInt8](repeating: 56, count: 1000) + [UInt8](repeating: 57, count: 1000), "\(current.count) bytes now")
        #expect(previous.count == 4000 && previous.first == 52 && previous.last == 55)
        #expect(!FileManager.default.fileExists(atPath: base + "/a"))
    }
}
