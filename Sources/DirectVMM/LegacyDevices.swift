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
