import KVM

/// Why a VM stopped.
public enum StopReason: Sendable, Equatable, CustomStringConvertible {
    /// The guest powered off (i8042 reset with `reboot=k`, or an ACPI/system-event shutdown).
    case powerOff
    /// The guest asked for a reboot; the VMM ends the VM instead (Linux `reboot -f` and `-no-reboot` semantics).
    case reboot
    /// All work done: a vCPU halted with no interrupt controller to wake it (tiny guests).
    case halted
    /// Triple fault: the CPU shut down.
    case tripleFault
    /// The caller asked the VM to stop.
    case requested
    /// The run outlived its deadline and was stopped.
    case timeout
    /// KVM or the VMM failed; the message says what happened (with a register dump when there was one).
    case error(String)

    public var description: String {
        switch self {
        case .powerOff: "guest powered off"
        case .reboot: "guest rebooted"
        case .halted: "vCPU halted"
        case .tripleFault: "guest triple-faulted (CPU shutdown)"
        case .requested: "stopped on request"
        case .timeout: "timed out"
        case .error(let m): m
        }
    }

    /// Whether this is how a healthy guest ends.
    public var isClean: Bool {
        switch self {
        case .powerOff, .reboot, .halted, .requested: true
        default: false
        }
    }
}

/// What the vCPU loop does with one exit.
public enum ExitAction: Sendable, Equatable {
    case resume
    /// Read `count` items of `size` bytes from the port bus and hand them to the guest.
    case portRead(port: UInt16, size: Int, count: Int)
    /// Write `count` items of `size` bytes (in `data`) to the port bus.
    case portWrite(port: UInt16, size: Int, data: ExitBytes)
    case mmioRead(address: UInt64, length: Int)
    case mmioWrite(address: UInt64, data: ExitBytes)
    /// Stop the whole VM; `dumpRegisters` asks the loop to attach the vCPU's registers.
    case stop(StopReason, dumpRegisters: Bool)
}

/// Maps a vCPU exit to an action. A pure function: it reads nothing but its argument, so every
/// exit, including ones KVM should never produce, is tested with made-up values.
public enum ExitHandler {
    /// `KVM_SYSTEM_EVENT_*` types.
    static let systemEventShutdown: UInt32 = 1, systemEventReset: UInt32 = 2, systemEventCrash: UInt32 = 3

    public static func decide(_ exit: VCPUExit) -> ExitAction {
        switch exit {
        case .portIn(let port, let size, let count):
            return .portRead(port: port, size: size, count: count)
        case .portOut(let port, let size, let count, let data):
            guard size > 0, count > 0, data.count == size * count else {
                return .stop(.error("malformed port write to 0x\(String(port, radix: 16)): \(data.count) bytes for \(count) × \(size)"), dumpRegisters: true)
            }
            return .portWrite(port: port, size: size, data: data)
        case .mmioRead(let address, let length):
            guard (1...8).contains(length) else { return .stop(.error("MMIO read of \(length) bytes at 0x\(String(address, radix: 16))"), dumpRegisters: true) }
            return .mmioRead(address: address, length: length)
        case .mmioWrite(let address, let data):
            guard (1...8).contains(data.count) else { return .stop(.error("MMIO write of \(data.count) bytes at 0x\(String(address, radix: 16))"), dumpRegisters: true) }
            return .mmioWrite(address: address, data: data)
        case .halt:
            return .stop(.halted, dumpRegisters: false)
        case .shutdown:
            return .stop(.tripleFault, dumpRegisters: true)
        case .systemEvent(let type):
            switch type {
            case systemEventShutdown: return .stop(.powerOff, dumpRegisters: false)
            case systemEventReset: return .stop(.reboot, dumpRegisters: false)
            case systemEventCrash: return .stop(.error("the guest reported a crash (KVM_SYSTEM_EVENT_CRASH)"), dumpRegisters: true)
            default: return .stop(.error("unknown KVM system event \(type)"), dumpRegisters: true)
            }
        case .internalError(let sub, let data):
            let what = sub == 1 ? "emulation failure: this host's KVM cannot execute an instruction the guest used (a software KVM? run under hardware KVM or `mvm rig run`)" : "suberror \(sub)"
            let extra = data.isEmpty ? "" : " data=[" + data.map { "0x" + String($0, radix: 16) }.joined(separator: ",") + "]"
            return .stop(.error("KVM internal error, \(what)\(extra)"), dumpRegisters: true)
        case .failEntry(let reason, let cpu):
            return .stop(.error("KVM could not enter the guest (hardware entry failure 0x\(String(reason, radix: 16)) on host CPU \(cpu)): the vCPU state is invalid"), dumpRegisters: true)
        case .interrupted, .irqWindowOpen:
            return .resume
        case .unknown(let reason):
            return .stop(.error("unexpected KVM exit reason \(reason)"), dumpRegisters: true)
        }
    }
}
