import MicroVMCore
import Devices
import Foundation
import GuestMemory
import Testing
@testable import DirectVMM
@testable import VMM
import KVM

let kvmUsable = FileManager.default.isWritableFile(atPath: "/dev/kvm")

/// Collects console bytes and MMIO writes from the vCPU threads.
final class Recorder: @unchecked Sendable {
    private let lock = NSLock()
    private var _console: [UInt8] = []
    private var _writes: [(UInt64, [UInt8])] = []
    func console(_ b: [UInt8]) { lock.lock(); _console += b; lock.unlock() }
    var text: String { lock.lock(); defer { lock.unlock() }; return String(decoding: _console, as: UTF8.self) }
    func mmio(_ off: UInt64, _ d: [UInt8]) { lock.lock(); _writes.append((off, d)); lock.unlock() }
    var writes: [(UInt64, [UInt8])] { lock.lock(); defer { lock.unlock() }; return _writes }
}

final class RecordingMMIO: BusDevice, @unchecked Sendable {
    let rec: Recorder
    init(_ rec: Recorder) { self.rec = rec }
    func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) { for i in 0..<data.count { data[i] = 0x5a } }
    func write(offset: UInt64, data: UnsafeRawBufferPointer) { rec.mmio(offset, Array(data)) }
}

/// Tiny guests assembled here, run through the same VirtualMachine code as Linux.
@Suite("Tiny guests on real KVM", .serialized, .enabled(if: kvmUsable, "no writable /dev/kvm on this host"), .timeLimit(.minutes(2)))
struct TinyGuestTests {
    func machine(cpus: Int = 1, irqchip: Bool = false, cpuSet: [Int] = [], _ rec: Recorder) throws -> VirtualMachine {
        let vm = try VirtualMachine(MachineConfiguration(cpus: cpus, memory: .mebibytes(4), interruptController: irqchip, cpuSet: cpuSet))
        try vm.installLegacyDevices { rec.console($0) }
        return vm
    }

    @Test func realModePortIOAndHalt() throws {
        let rec = Recorder()
        let vm = try machine(rec)
        let code: [UInt8] = [
            0xba, 0xf8, 0x03, 0xb0, 0x48, 0xee, 0xb0, 0x69, 0xee,  // mov dx,0x3f8; 'H'; 'i'
            0xba, 0xfd, 0x03, 0xec,                                // mov dx,0x3fd; in al,dx (LSR)
            0xba, 0xf8, 0x03, 0xee, 0xf4,                          // echo it to COM1; hlt
        ]
        try vm.memory.writeBytes(code, at: 0x1000)
        let reason = try vm.run(BootEntry(.real(segment: 0, offset: 0x1000)), timeout: 30)
        #expect(reason == .halted)
        #expect(rec.text == "Hi\u{60}")
        #expect(vm.firstExitSeconds != nil)
    }

    @Test func longModeConsoleAndMMIO() throws {
        let rec = Recorder()
        let vm = try machine(rec)
        try vm.addMMIODevice(RecordingMMIO(rec), address: 0xd000_0000, length: 0x1000)
        let code: [UInt8] = [
            0xbe, 0x00, 0x01, 0x10, 0x00,       // mov esi, msg
            0x66, 0xba, 0xf8, 0x03,             // mov dx, 0x3f8
            0xac, 0x84, 0xc0, 0x74, 0x03,       // 1: lodsb; test al,al; jz 2f
            0xee, 0xeb, 0xf8,                   // out dx,al; jmp 1b
            0xb8, 0x00, 0x00, 0x00, 0xd0,       // 2: mov eax, 0xd0000000
            0xc7, 0x00, 0x78, 0x56, 0x34, 0x12, // mov dword [rax], 0x12345678
            0xb9, 0x00, 0x00, 0x00, 0xe0,       // mov ecx, 0xe0000000 (nothing there)
            0x8b, 0x19,                         // mov ebx, [rcx]
            0x89, 0x58, 0x04,                   // mov [rax+4], ebx
            0x8b, 0x58, 0x08,                   // mov ebx, [rax+8] (device reads 0x5a)
            0x89, 0x58, 0x0c,                   // mov [rax+12], ebx
            0xf4,                               // hlt
        ]
        try vm.memory.writeBytes(code, at: 0x10_0000)
        try vm.memory.writeBytes(Array("long mode\n\0".utf8), at: 0x10_0100)
        let reason = try vm.run(BootEntry(.long64(entry: 0x10_0000, bootParams: 0)), timeout: 30)
        #expect(reason == .halted)
        #expect(rec.text == "long mode\n")
        let w = rec.writes
        #expect(w.count == 3)
        #expect(w.first?.0 == 0 && w.first?.1 == [0x78, 0x56, 0x34, 0x12])
        #expect(w.count > 1 && w[1].0 == 4 && w[1].1 == [0xff, 0xff, 0xff, 0xff])
        #expect(w.count > 2 && w[2].0 == 12 && w[2].1 == [0x5a, 0x5a, 0x5a, 0x5a])
        #expect(vm.mmioBus.unhandled.load(ordering: .relaxed) == 1)
    }

    @Test func tripleFaultEndsWithAClearReason() throws {
        let rec = Recorder()
        let vm = try machine(rec)
        try vm.memory.writeBytes([0x0f, 0x0b], at: 0x10_0000)  // ud2 with no IDT: #UD → #DF → shutdown
        let reason = try vm.run(BootEntry(.long64(entry: 0x10_0000, bootParams: 0)), timeout: 30)
        print("ud2 without an IDT ended with: \(reason)")
        #expect(!reason.isClean)
        #expect(reason == .tripleFault || "\(reason)".contains("KVM"))
        #expect(vm.registerDump?.contains("rip=") == true)
    }

    @Test func infiniteLoopTimesOutAndStops() throws {
        let rec = Recorder()
        let vm = try machine(cpus: 2, irqchip: true, rec)
        try vm.memory.writeBytes([0xeb, 0xfe], at: 0x10_0000)  // jmp .
        let reason = try vm.run(BootEntry(.long64(entry: 0x10_0000, bootParams: 0)), timeout: 0.5)
        #expect(reason == .timeout)
    }

    @Test func stopRequestEndsASpinningGuest() throws {
        let rec = Recorder()
        let vm = try machine(rec)
        try vm.memory.writeBytes([0xeb, 0xfe], at: 0x1000)
        try vm.setBootEntry(BootEntry(.real(segment: 0, offset: 0x1000)))
        try vm.start()
        Thread.sleep(forTimeInterval: 0.2)
        vm.requestStop()
        #expect(vm.wait(timeout: 20) == .requested)
    }

    @Test func i8042ResetPowersOffAnSMPMachine() throws {
        let rec = Recorder()
        let vm = try machine(cpus: 2, irqchip: true, cpuSet: [0], rec)
        let code: [UInt8] = [
            0x66, 0xba, 0xf8, 0x03, 0xb0, 0x6f, 0xee, 0xb0, 0x6b, 0xee,  // "ok"
            0xb0, 0xfe, 0xe6, 0x64,                                      // i8042: pulse reset
            0xeb, 0xfe,                                                  // spin until stopped
        ]
        try vm.memory.writeBytes(code, at: 0x10_0000)
        let reason = try vm.run(BootEntry(.long64(entry: 0x10_0000, bootParams: 0)), timeout: 30)
        #expect(reason == .powerOff)
        #expect(rec.text == "ok")
    }

    @Test
    func garbageCodeNeverHangsOrCrashes() throws {
        var rng = SplitMix(seed: 0x6d766d)
        for round in 0..<8 {
            let rec = Recorder()
            let vm = try machine(rec)
            let junk = (0..<4096).map { _ in UInt8(truncatingIfNeeded: rng.next() as UInt64) }
            try vm.memory.writeBytes(junk, at: 0x10_0000)
            let reason = try vm.run(BootEntry(.long64(entry: 0x10_0000, bootParams: 0)), timeout: 3)
            print("garbage round \(round): \(reason.description.prefix(120))")
            // Every end is acceptable except a hang (the time limit) or a clean-looking one that
            // the guest cannot have caused; a stuck vCPU is abandoned with an error, not waited on.
            #expect(reason != .requested)
        }
    }

    @Test func benchHookMeasuresFirstInstruction() throws {
        let ms = try DirectVMMBench.startToFirstInstruction(iterations: 3)
        print("VMM start → first guest instruction (ms): \(ms.map { String(format: "%.2f", $0) })")
        #expect(ms.count == 3)
        #expect(ms.allSatisfy { $0 > 0 })
    }
}

typealias SplitMix = SeededGenerator
