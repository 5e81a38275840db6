import Devices
import GuestMemory
import MicroVMCore

/// Timing hooks for the benchmark (not tests): how long the VMM takes from starting to build a
/// VM to the guest's first instruction, measured on a tiny guest whose first instruction is an
/// `out` (the exit it causes is the timestamp).
public enum DirectVMMBench {
    /// A long-mode guest at 1 MiB: `out 0x80, al` then spin.
    static let guest: [UInt8] = [0xe6, 0x80, 0xeb, 0xfe]

    /// Milliseconds from `VirtualMachine.init` entry to the first guest exit, once per iteration
    /// (1 vCPU, 128 MiB, in-kernel irqchip and PIT, legacy devices: the Linux configuration).
    public static func startToFirstInstruction(iterations: Int, devicePath: String = "/dev/kvm") throws -> [Double] {
        var out: [Double] = []
        for _ in 0..<max(0, iterations) {
            let vm = try VirtualMachine(MachineConfiguration(cpus: 1, memory: .mebibytes(128), devicePath: devicePath))
            try vm.installLegacyDevices { _ in }
            try vm.addPortDevice(StopOnWrite(vm), port: 0x80, length: 1)
            try vm.memory.writeBytes(guest, at: GuestAddress(0x10_0000))
            let reason = try vm.run(BootEntry(.long64(entry: 0x10_0000, bootParams: 0)), timeout: 10)
            guard reason == .requested, let t = vm.firstExitSeconds else {
                throw MicroVMError(.hypervisor, "the timing guest did not reach its first instruction: \(reason)")
            }
            out.append(t * 1000)
        }
        return out
    }
}

/// Stops the VM on any write: the end of a timing guest.
final class StopOnWrite: BusDevice, @unchecked Sendable {
    weak var vm: VirtualMachine?
    init(_ vm: VirtualMachine) { self.vm = vm }
    func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {}
    func write(offset: UInt64, data: UnsafeRawBufferPointer) { vm?.requestStop(.requested) }
}
