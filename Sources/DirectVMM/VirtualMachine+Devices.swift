import Devices
import MicroVMCore

/// The PC devices every direct VM has, as wired by `installLegacyDevices`.
public struct LegacyDevices: Sendable {
    public let uart: ConsoleUART
    public let reset: ResetController
    public let bootTimer: BootTimerPort
}

extension VirtualMachine {
    public static let com1Port: UInt16 = 0x3f8
    public static let com1IRQ: UInt32 = 4
    public static let i8042Port: UInt16 = 0x60

    /// COM1 (0x3f8, IRQ 4) printing to `console`, the i8042 whose reset line powers the VM off,
    /// and the boot timer at 0x440.
    @discardableResult
    public func installLegacyDevices(console: @escaping @Sendable ([UInt8]) -> Void) throws -> LegacyDevices {
        let uart = ConsoleUART(interrupt: configuration.interruptController ? interruptLine(gsi: Self.com1IRQ) : nil, output: console)
        try addPortDevice(uart, port: Self.com1Port, length: 8)
        // Weak: the bus holds the device, and the VM holds the bus.
        let reset = ResetController { [weak self] in self?.requestStop(.powerOff) }
        try addPortDevice(reset, port: Self.i8042Port, length: 5)
        let timer = BootTimerPort(origin: createdAt)
        try addPortDevice(timer, port: GuestProtocol.bootTimerPort, length: 1)
        return LegacyDevices(uart: uart, reset: reset, bootTimer: timer)
    }
}
