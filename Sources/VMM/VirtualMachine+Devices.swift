import Devices
import MicroVMCore

/// The PC devices every direct VM has, as wired by `installLegacyDevices`.
public struct LegacyDevices: Sendable {
    public let serial: Serial8250
    public let i8042: I8042
    public let bootTimer: BootTimer
    public let clock: CMOSClock
}

extension VirtualMachine {
    /// Kernel parameters this machine needs: no PS/2 mouse or mux probing (the i8042 has a
    /// keyboard line and a reset line only), no PCI bus to scan. The keyboard is found through
    /// PnP, from the DSDT's PS2K device: on this hardware-reduced ACPI machine that is what maps
    /// its IRQ 1, so a Ctrl-Alt-Del (`SendCtrlAltDel`, `mvm stop`) reaches the guest kernel.
    public static let kernelParameters = "i8042.noaux i8042.nomux i8042.dumbkbd pci=off"

    public static let com1Port: UInt16 = 0x3f8
    public static let com1IRQ: UInt32 = 4
    public static let i8042Port: UInt16 = 0x60
    public static let keyboardIRQ: UInt32 = 1
    public static let cmosPort: UInt16 = 0x70

    /// COM1 (0x3f8, IRQ 4) printing to `console`, the i8042 whose reset line powers the VM off
    /// (Linux with `reboot=k`), the CMOS clock, and the boot timer at 0x440. Boot time is
    /// measured from `createdInstant` — the moment this VM's construction began — rather than
    /// process start, so a long-lived process that runs many VMs times each one.
    @discardableResult
    public func installLegacyDevices(console: @escaping OutputSink) throws -> LegacyDevices {
        let serial = Serial8250(interrupt: interruptLine(gsi: Self.com1IRQ), output: console)
        try addPortDevice(serial, port: Self.com1Port, length: 8)
        // Weak: the bus holds the device, and the VM holds the bus.
        let i8042 = I8042(keyboardInterrupt: interruptLine(gsi: Self.keyboardIRQ)) { [weak self] in self?.requestStop(.powerOff) }
        try addPortDevice(i8042, port: Self.i8042Port, length: 5)
        let clock = CMOSClock()
        try addPortDevice(clock, port: Self.cmosPort, length: 2)
        let timer = BootTimer(start: createdInstant)
        try addPortDevice(timer, port: GuestProtocol.bootTimerPort, length: 1)
        return LegacyDevices(serial: serial, i8042: i8042, bootTimer: timer, clock: clock)
    }
}

extension VirtualMachine {
    /// CLOCK_MONOTONIC seconds when the guest's init wrote the boot timer (nil before it did).
    public func readyAt(_ devices: LegacyDevices) -> Double? {
        devices.bootTimer.bootTime.map { createdAt + Double($0.components.seconds) + Double($0.components.attoseconds) / 1e18 }
    }
}
