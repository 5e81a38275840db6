import MicroVMCore
import Synchronization

/// Just enough of the PS/2 keyboard controller for Linux: its probe finds a controller that
/// passes self-test, the reset command (0xFE to port 0x64, how `reboot=k` ends the VM) calls
/// the injected reset callback, and the VMM can type Ctrl-Alt-Del (`pressCtrlAltDel`), as
/// Firecracker's `SendCtrlAltDel` does. No other keys.
///
/// Insert at `Layout.i8042Port` (0x60) with length 5: offset 0 is the data port (0x60),
/// offset 1 is system control port B (0x61, which KVM's in-kernel PIT answers first when the
/// VMM creates one), offset 4 is status (read) / command (write) at 0x64.
public final class I8042: BusDevice {
    public enum Port {
        public static let data: UInt64 = 0
        public static let portB: UInt64 = 1
        public static let command: UInt64 = 4
    }
    public static let length: UInt64 = 5

    /// Status register bits. The corresponding C constants are `I8042_STR_*` in Linux.
    public enum Status {
        public static let outputFull: UInt8 = 0x01
        public static let inputFull: UInt8 = 0x02
        public static let systemFlag: UInt8 = 0x04
        public static let lastWasCommand: UInt8 = 0x08
        public static let keyboardUnlocked: UInt8 = 0x10
        public static let auxData: UInt8 = 0x20
    }

    public enum Command {
        public static let readConfig: UInt8 = 0x20
        public static let writeConfig: UInt8 = 0x60
        public static let disableAux: UInt8 = 0xa7
        public static let enableAux: UInt8 = 0xa8
        public static let testAux: UInt8 = 0xa9
        public static let selfTest: UInt8 = 0xaa
        public static let testKeyboard: UInt8 = 0xab
        public static let disableKeyboard: UInt8 = 0xad
        public static let enableKeyboard: UInt8 = 0xae
        public static let readInputPort: UInt8 = 0xc0
        public static let readOutputPort: UInt8 = 0xd0
        public static let writeOutputPort: UInt8 = 0xd1
        public static let writeKeyboardBuffer: UInt8 = 0xd2
        public static let writeAuxBuffer: UInt8 = 0xd3
        public static let writeAux: UInt8 = 0xd4
        /// Pulses the CPU reset line (output port bit 0).
        public static let reset: UInt8 = 0xfe
    }

    struct State {
        var config: UInt8 = 0x45  // keyboard interrupt, system flag, scancode translation
        var outputPort: UInt8 = 0x01  // bit 0 high: CPU not held in reset
        var portB: UInt8 = 0
        var status: UInt8 = Status.systemFlag | Status.keyboardUnlocked
        var buffer: [(byte: UInt8, aux: Bool)] = []
        var awaiting: UInt8?
        var resets = 0
        var ignored = 0

        mutating func respond(_ b: UInt8, aux: Bool = false) {
            guard buffer.count < 16 else { return }
            buffer.append((b, aux))
        }
    }

    private let state = Mutex(State())
    private let onReset: @Sendable () -> Void
    private let keyboardInterrupt: (any InterruptLine)?

    /// - Parameters:
    ///   - keyboardInterrupt: IRQ 1, raised when a byte is ready and the config byte enables it;
    ///     nil leaves the controller polled only.
    ///   - onReset: called (outside the device's lock) each time the guest pulses reset.
    public init(keyboardInterrupt: (any InterruptLine)? = nil, onReset: @escaping @Sendable () -> Void) {
        self.keyboardInterrupt = keyboardInterrupt
        self.onReset = onReset
    }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        let more = state.withLock { s -> Bool in
            for i in 0..<data.count { data[i] = 0 }
            guard data.count > 0 else { return false }
            switch offset {
            case Port.data:
                if s.buffer.isEmpty {
                    data[0] = 0
                } else {
                    data[0] = s.buffer.removeFirst().byte
                    // The next byte interrupts again, as the controller's output-full line would.
                    return !s.buffer.isEmpty && s.config & 0x01 != 0
                }
            case Port.portB:
                // Bit 5 is the PIT channel 2 output; reading it high lets Linux's PIT-based
                // calibration loop finish when no in-kernel PIT answers this port.
                data[0] = s.portB | 0x20
            case Port.command:
                var v = s.status
                if let first = s.buffer.first {
                    v |= Status.outputFull
                    if first.aux { v |= Status.auxData }
                }
                data[0] = v
            default:
                break
            }
            return false
        }
        if more { keyboardInterrupt?.trigger() }
    }

    /// Scancodes (set 1, as the controller's translation delivers them) of Ctrl and Alt pressed,
    /// Delete pressed and released, then Alt and Ctrl released.
    public static let ctrlAltDel: [UInt8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]

    /// Types Ctrl-Alt-Del on the keyboard: Linux reboots (or signals its init), and a reboot
    /// through this controller's reset line ends the VM. The bytes interrupt on IRQ 1.
    public func pressCtrlAltDel() {
        // Interrupts even when a byte was already waiting: an edge for a byte the driver never
        // read is long gone, and without a new one the keys would wait behind it forever.
        let irq = state.withLock { s -> Bool in
            for b in Self.ctrlAltDel { s.respond(b) }
            return s.config & 0x01 != 0
        }
        if irq { keyboardInterrupt?.trigger() }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        guard data.count > 0 else { return }
        let value = data[0]
        let (reset, irq) = state.withLock { s -> (Bool, Bool) in
            let hadData = !s.buffer.isEmpty, wasEnabled = s.config & 0x01 != 0
            var reset = false
            switch offset {
            case Port.command:
                s.status |= Status.lastWasCommand
                s.awaiting = nil
                reset = command(value, &s)
            case Port.data:
                s.status &= ~Status.lastWasCommand
                reset = dataWrite(value, &s)
            case Port.portB:
                s.portB = value & 0x0f  // only the gate/speaker/parity-enable bits are writable
            default:
                s.ignored += 1
            }
            if reset { s.resets += 1 }
            // A byte that arrived, or bytes that waited while the keyboard interrupt was off
            // (keys typed while the driver set the controller up) and now may interrupt.
            let irq = !s.buffer.isEmpty && s.config & 0x01 != 0 && (!hadData || !wasEnabled)
            return (reset, irq)
        }
        if irq { keyboardInterrupt?.trigger() }
        if reset { onReset() }
    }

    /// Handles a controller command; returns true if it resets the CPU.
    private func command(_ c: UInt8, _ s: inout State) -> Bool {
        switch c {
        case Command.readConfig: s.respond(s.config)
        case Command.writeConfig, Command.writeOutputPort, Command.writeKeyboardBuffer,
             Command.writeAuxBuffer, Command.writeAux:
            s.awaiting = c
        case Command.disableAux: s.config |= 0x20
        case Command.enableAux: s.config &= ~0x20
        case Command.testAux: s.respond(0x00)
        case Command.selfTest: s.respond(0x55)
        case Command.testKeyboard: s.respond(0x00)
        case Command.disableKeyboard: s.config |= 0x10
        case Command.enableKeyboard: s.config &= ~0x10
        case Command.readInputPort: s.respond(0x00)
        case Command.readOutputPort: s.respond(s.outputPort)
        case 0xf0...0xff:
            // Pulse output lines: a clear bit in the low nibble pulses that line; bit 0 is reset.
            return c & 0x01 == 0
        default:
            s.ignored += 1
        }
        return false
    }

    /// Handles a data-port write: the argument of a pending command, else a byte for the
    /// (absent) keyboard, which is dropped.
    private func dataWrite(_ v: UInt8, _ s: inout State) -> Bool {
        defer { s.awaiting = nil }
        switch s.awaiting {
        case Command.writeConfig:
            s.config = v
        case Command.writeOutputPort:
            s.outputPort = v
            return v & 0x01 == 0  // output port bit 0 low holds the CPU in reset
        case Command.writeKeyboardBuffer:
            s.respond(v)
        case Command.writeAuxBuffer:
            s.respond(v, aux: true)
        case Command.writeAux:
            break  // no mouse
        default:
            s.ignored += 1
        }
        return false
    }

    /// How many times the guest asked for a reset.
    public var resetCount: Int { state.withLock { $0.resets } }
    /// Commands and bytes the controller did not understand (a flood is worth logging).
    public var ignoredCount: Int { state.withLock { $0.ignored } }
}
