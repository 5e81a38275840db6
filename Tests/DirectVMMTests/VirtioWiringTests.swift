import Devices
import Foundation
import GuestMemory
import MicroVMCore
import Testing
@testable import DirectVMM
@testable import VMM

/// The virtio devices as the direct VMM places them, seen from a tiny guest on real KVM.
@Suite("Virtio on the direct VMM", .serialized, .enabled(if: kvmUsable, "no writable /dev/kvm on this host"), .timeLimit(.minutes(2)))
struct VirtioWiringTests {
    /// A one-vCPU machine with a 16-sector disk and the entropy device, as the VMM places them.
    func machineWithDisk(irqchip: Bool = false, _ body: (VirtualMachine, [VirtioAttachment]) throws -> Void) throws {
        let disk = NSTemporaryDirectory() + "mvm-virtio-wiring-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).img"
        #expect(FileManager.default.createFile(atPath: disk, contents: Data(count: 16 * 512)))
        defer { unlink(disk) }
        let vm = try VirtualMachine(MachineConfiguration(cpus: 1, memory: .mebibytes(4), interruptController: irqchip))
        try vm.installLegacyDevices { _ in }
        let virtio = try vm.installVirtioDevices(spec: VMSpec(name: "w", disks: [DiskSpec(path: disk)]))
        defer { virtio.attachments.forEach { $0.stop() } }
        #expect(virtio.cmdline == "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6")
        try body(vm, virtio.attachments)
    }

    @Test func guestReadsTheVirtioRegisters() throws {
        try machineWithDisk { vm, attachments in
            let code: [UInt8] = [
                0xb8, 0x00, 0x00, 0x00, 0xd0,             // mov eax, 0xd0000000
                0x8b, 0x18,                               // mov ebx, [rax]      (magic)
                0x89, 0x1c, 0x25, 0x00, 0x02, 0x10, 0x00, // mov [0x100200], ebx
                0x8b, 0x58, 0x08,                         // mov ebx, [rax+8]    (device id)
                0x89, 0x1c, 0x25, 0x04, 0x02, 0x10, 0x00, // mov [0x100204], ebx
                0x8b, 0x98, 0x00, 0x10, 0x00, 0x00,       // mov ebx, [rax+0x1000] (the rng behind it)
                0x89, 0x1c, 0x25, 0x08, 0x02, 0x10, 0x00, // mov [0x100208], ebx
                0xf4,                                     // hlt
            ]
            try vm.memory.writeBytes(code, at: 0x10_0000)
            let reason = try vm.run(BootEntry(.long64(entry: 0x10_0000, bootParams: 0)), timeout: 30)
            #expect(reason == .halted)
            #expect(try vm.memory.read(at: 0x10_0200, as: UInt32.self) == VirtioMMIOTransport.magic)
            #expect(try vm.memory.read(at: 0x10_0204, as: UInt32.self) == 2)
            #expect(try vm.memory.read(at: 0x10_0208, as: UInt32.self) == VirtioMMIOTransport.magic)
        }
    }

    @Test func queueNotifyNeedsNoExitOnceRegistered() throws {
        try machineWithDisk { vm, attachments in
            let code: [UInt8] = [
                0xb8, 0x50, 0x00, 0x00, 0xd0,             // mov eax, 0xd0000050 (the disk's QueueNotify)
                0xc7, 0x00, 0x00, 0x00, 0x00, 0x00,       // mov dword [rax], 0 (queue 0)
                0xc7, 0x00, 0x07, 0x00, 0x00, 0x00,       // mov dword [rax], 7 (no such queue: no match)
                0xf4,                                     // hlt
            ]
            try vm.memory.writeBytes(code, at: 0x10_0000)
            let reason = try vm.run(BootEntry(.long64(entry: 0x10_0000, bootParams: 0)), timeout: 30)
            #expect(reason == .halted)
            let disk0 = attachments[0].transport
            let registered = vm.ioeventfdsRegistered.load(ordering: .relaxed)
            print("ioeventfds registered: \(registered); notify exits on the disk: \(disk0.notifyExits.load(ordering: .relaxed))")
            if registered > 0 {
                // Queue 0's kick stayed in KVM; the unmatched value still exits and is refused.
                #expect(disk0.notifyExits.load(ordering: .relaxed) == 1)
                #expect(registered == attachments.reduce(0) { $0 + $1.transport.queueCount })
            } else {
                #expect(disk0.notifyExits.load(ordering: .relaxed) == 2)
            }
        }
    }

    @Test func interruptsUseIRQFDWithTheInKernelIRQChip() throws {
        try machineWithDisk(irqchip: true) { vm, attachments in
            #expect(vm.irqfdsRegistered.load(ordering: .relaxed) == attachments.count)
            #expect(attachments.allSatisfy { $0.transport.interrupt is KVMIRQFDLine })
            attachments[0].transport.interrupt.trigger()  // an eventfd write, accepted by KVM
        }
    }

    @Test func withoutAnIRQChipInterruptsFallBackToIRQLine() throws {
        try machineWithDisk { vm, attachments in
            #expect(vm.irqfdsRegistered.load(ordering: .relaxed) == 0)
            #expect(attachments.allSatisfy { $0.transport.interrupt is KVMInterruptLine })
        }
    }
}
