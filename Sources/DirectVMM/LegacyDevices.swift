import Devices
import Foundation
import KVM
import MicroVMCore
import Synchronization

/// An interrupt line into KVM's in-kernel PIC/IOAPIC (`KVM_IRQ_LINE`). Failures are dropped:
/// a VM without an irqchip simply has no interrupts.
public struct KVMInterruptLine: InterruptLine {
    let vm: KVMVirtualMachine
    public let gsi: UInt32
    public init(vm: KVMVirtualMachine, gsi: UInt32) { self.vm = vm; self.gsi = gsi }
    public func trigger() {
        try? vm.setIRQLine(gsi, level: true)
        try? vm.setIRQLine(gsi, level: false)
    }
    public func set(level: Bool) { try? vm.setIRQLine(gsi, level: level) }
}

/// A 16450-style UART register file: enough of an 8250 for Linux's serial console and tty
/// (transmit, receive, the THRE and RX interrupts). Transmit is instant, so THR is always empty.
public final class ConsoleUART: BusDevice, @unchecked Sendable {
    struct State {
        var ier: UInt8 = 0, lcr: UInt8 = 0, mcr: UInt8 = 0, scr: UInt8 = 0, dll: UInt8 = 0x0c, dlm: UInt8 = 0
        var thrInterruptPending = false
        var input: [UInt8] = []
        var lineHigh = false
    }
    private let state = Mutex(State())
    private let output: @Sendable ([UInt8]) -> Void
    private let line: (any InterruptLine)?

    public init(interrupt: (any InterruptLine)?, output: @escaping @Sendable ([UInt8]) -> Void) {
        self.line = interrupt; self.output = output
    }

    /// Queues bytes the guest reads from RBR (console input).
    public func enqueueInput(_ bytes: [UInt8]) {
        state.withLock { s in
            s.input.append(contentsOf: bytes.prefix(max(0, 4096 - s.input.count)))
            updateLine(&s)
        }
    }

    private func iir(_ s: State) -> UInt8 {
        if s.ier & 0x01 != 0 && !s.input.isEmpty { return 0x04 }
        if s.ier & 0x02 != 0 && s.thrInterruptPending { return 0x02 }
        return 0x01
    }

    private func updateLine(_ s: inout State) {
        let high = iir(s) != 0x01 && s.mcr & 0x08 != 0  // OUT2 gates the IRQ on PC UARTs
        if high != s.lineHigh {
            s.lineHigh = high
            line?.set(level: high)
        }
    }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        guard !data.isEmpty else { return }
        for i in 0..<data.count { data[i] = 0 }
        let v: UInt8 = state.withLock { s in
            let dlab = s.lcr & 0x80 != 0
            var v: UInt8 = 0
            switch offset {
            case 0:
                if dlab { v = s.dll } else if !s.input.isEmpty { v = s.input.removeFirst() }
            case 1: v = dlab ? s.dlm : s.ier
            case 2:
                v = iir(s)
                if v == 0x02 { s.thrInterruptPending = false }
            case 3: v = s.lcr
            case 4: v = s.mcr
            case 5: v = 0x60 | (s.input.isEmpty ? 0 : 0x01)  // THR empty, transmitter idle
            case 6: v = s.mcr & 0x10 != 0 ? ((s.mcr & 0x0c) << 4) | ((s.mcr & 0x03) << 4) : 0xb0
            case 7: v = s.scr
            default: v = 0
            }
            updateLine(&s)
            return v
        }
        data[0] = v
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        guard let v = data.first else { return }
        var out: UInt8?
        state.withLock { s in
            let dlab = s.lcr & 0x80 != 0
            switch offset {
            case 0:
                if dlab { s.dll = v } else if s.mcr & 0x10 != 0 { s.input.append(v) } else { out = v; s.thrInterruptPending = true }
            case 1:
                if dlab { s.dlm = v } else {
                    if v & 0x02 != 0 && s.ier & 0x02 == 0 { s.thrInterruptPending = true }
                    s.ier = v & 0x0f
                }
            case 3: s.lcr = v
            case 4: s.mcr = v & 0x1f
            case 7: s.scr = v
            default: break
            }
            updateLine(&s)
        }
        if let out { output([out]) }
    }
}

/// The i8042 controller as far as a guest needs it: the command byte round trip that Linux's
/// probe does, and command 0xFE (pulse the reset line), which `reboot=k` uses to power off.
public final class ResetController: BusDevice, @unchecked Sendable {
    struct State { var commandByte: UInt8 = 0x01; var outputBuffer: UInt8?; var expectingCommandByte = false }
    private let state = Mutex(State())
    private let onReset: @Sendable () -> Void

    public init(onReset: @escaping @Sendable () -> Void) { self.onReset = onReset }

    /// offset 0 is port 0x60 (data), offset 4 is port 0x64 (status/command).
    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        guard !data.isEmpty else { return }
        for i in 0..<data.count { data[i] = 0 }
        data[0] = state.withLock { s in
            switch offset {
            case 0: defer { s.outputBuffer = nil }; return s.outputBuffer ?? 0
            case 4: return s.outputBuffer != nil ? 0x01 : 0x00
            default: return 0
            }
        }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        guard let v = data.first else { return }
        var reset = false
        state.withLock { s in
            switch (offset, v) {
            case (4, 0xfe): reset = true
            case (4, 0x20): s.outputBuffer = s.commandByte
            case (4, 0x60): s.expectingCommandByte = true
            case (4, 0xaa): s.outputBuffer = 0x55  // self-test passed
            case (0, _) where s.expectingCommandByte: s.commandByte = v; s.expectingCommandByte = false
            default: break
            }
        }
        if reset { onReset() }
    }
}

/// Port 0x440: the guest init writes 123 at boot complete; the first such write is timestamped
/// in seconds since the VMM created the VM (`VirtualMachine.createdAt`, CLOCK_MONOTONIC).
public final class BootTimerPort: BusDevice, @unchecked Sendable {
    private let origin: Double
    private let stamp = Mutex<Double?>(nil)
    public init(origin: Double) { self.origin = origin }
    public var bootSeconds: Double? { stamp.withLock { $0 } }
    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) { for i in 0..<data.count { data[i] = 0 } }
    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        guard offset == 0, data.first == GuestProtocol.bootTimerValue else { return }
        let now = VirtualMachine.monotonicNow()
        stamp.withLock { if $0 == nil { $0 = now - origin } }
    }
}
