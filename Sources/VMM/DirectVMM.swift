/// DirectVMM: MicroVM's own virtual machine monitor on raw KVM. It builds a VM in one order —
/// guest memory, the KVM VM, the in-kernel irqchip and PIT, vCPUs (CPUID, MSRs, FPU, LAPIC),
/// the PC devices (COM1, i8042, boot timer) and virtio-mmio devices, then the kernel — and runs
/// one thread per vCPU whose exits a pure `ExitHandler` maps to actions.
///
/// ```swift
/// // A whole run, as `mvm run --mode direct` does it:
/// let result = try await DirectBackend().run(VMSpec(cpus: 2, command: ["uname", "-r"]))
///
/// // Or the machine itself, e.g. with a guest assembled in a test:
/// let vm = try VirtualMachine(MachineConfiguration(cpus: 1, memory: .mebibytes(4), interruptController: false))
/// try vm.installLegacyDevices { bytes in print(String(decoding: bytes, as: UTF8.self), terminator: "") }
/// try vm.memory.writeBytes([0xb0, 0x41, 0xe6, 0xf8 /* … */], at: 0x1000)
/// let reason = try vm.run(BootEntry(.real(segment: 0, offset: 0x1000)), timeout: 10)
/// ```
import LinuxBoot

extension BootEntry {
    /// The boot engineer's loader result as this VMM's entry.
    public init(_ k: KernelEntry) {
        switch k.mode {
        case .long64(let bp): self.init(.long64(entry: k.entry.rawValue, bootParams: bp.rawValue), stackPointer: Layout.bootStack.rawValue)
        case .pvh32(let si): self.init(.pvh32(entry: k.entry.rawValue, startInfo: si.rawValue), stackPointer: Layout.bootStack.rawValue)
        }
    }
}
