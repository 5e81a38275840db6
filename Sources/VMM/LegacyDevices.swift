import Devices
import KVM
import MicroVMCore

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

/// An edge-triggered GSI raised through KVM_IRQFD: `trigger()` is one eventfd write, which KVM
/// turns into a pulse on the in-kernel IOAPIC pin without an ioctl from the device thread.
/// Level changes (unused by virtio-mmio) still go through KVM_IRQ_LINE.
public final class KVMIRQFDLine: InterruptLine {
    let vm: KVMVirtualMachine
    let eventFD: EventFD
    public let gsi: UInt32

    /// Registers a new eventfd for `gsi`; throws where KVM refuses (no in-kernel irqchip).
    public init(vm: KVMVirtualMachine, gsi: UInt32) throws {
        self.vm = vm
        self.gsi = gsi
        eventFD = try EventFD()
        try vm.registerIRQFD(eventFD, gsi: gsi)
    }

    public func trigger() { eventFD.signal() }
    public func set(level: Bool) { try? vm.setIRQLine(gsi, level: level) }
}
