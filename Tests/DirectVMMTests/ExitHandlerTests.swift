import Testing
@testable import DirectVMM
@testable import VMM
import KVM
import Devices

@Suite("Exit handler")
struct ExitHandlerTests {
    @Test func portIOGoesToTheBus() {
        #expect(ExitHandler.decide(.portIn(port: 0x3fd, size: 1, count: 1)) == .portRead(port: 0x3fd, size: 1, count: 1))
        #expect(ExitHandler.decide(.portOut(port: 0x3f8, size: 1, count: 2, data: [0x41, 0x42])) == .portWrite(port: 0x3f8, size: 1, data: [0x41, 0x42]))
    }

    @Test func malformedPortWriteStopsWithError() {
        guard case .stop(.error(let m), true) = ExitHandler.decide(.portOut(port: 0x3f8, size: 2, count: 2, data: [1])) else {
            Issue.record("a port write whose data does not match size × count must stop the VM"); return
        }
        #expect(m.contains("0x3f8"))
    }

    @Test func mmioGoesToTheBusWithinBounds() {
        #expect(ExitHandler.decide(.mmioRead(address: 0xd000_0000, length: 4)) == .mmioRead(address: 0xd000_0000, length: 4))
        #expect(ExitHandler.decide(.mmioWrite(address: 0xd000_0070, data: [1, 2])) == .mmioWrite(address: 0xd000_0070, data: [1, 2]))
        if case .stop(.error, _) = ExitHandler.decide(.mmioRead(address: 0, length: 0)) {} else { Issue.record("zero-length MMIO read must stop") }
        if case .stop(.error, _) = ExitHandler.decide(.mmioWrite(address: 0, data: ExitBytes(Array(repeating: 0, count: 9)))) {} else { Issue.record("9-byte MMIO write must stop") }
    }

    @Test func endsOfTheGuest() {
        #expect(ExitHandler.decide(.halt) == .stop(.halted, dumpRegisters: false))
        #expect(ExitHandler.decide(.shutdown) == .stop(.tripleFault, dumpRegisters: true))
        #expect(ExitHandler.decide(.systemEvent(type: 1)) == .stop(.powerOff, dumpRegisters: false))
        #expect(ExitHandler.decide(.systemEvent(type: 2)) == .stop(.reboot, dumpRegisters: false))
        if case .stop(.error(let m), true) = ExitHandler.decide(.systemEvent(type: 3)) { #expect(m.contains("crash")) } else { Issue.record("crash event") }
        if case .stop(.error, true) = ExitHandler.decide(.systemEvent(type: 99)) {} else { Issue.record("unknown system event") }
    }

    @Test func failuresStopWithARegisterDumpAndAHint() {
        guard case .stop(.error(let m), true) = ExitHandler.decide(.internalError(suberror: 1, data: [0x1f])) else {
            Issue.record("internal error must stop"); return
        }
        #expect(m.contains("emulation failure") && m.contains("0x1f") && m.contains("rig"))
        if case .stop(.error(let m2), true) = ExitHandler.decide(.failEntry(hardwareReason: 0x80000021, cpu: 3)) {
            #expect(m2.contains("0x80000021"))
        } else { Issue.record("fail entry must stop") }
        if case .stop(.error(let m3), true) = ExitHandler.decide(.unknown(reason: 4242)) {
            #expect(m3.contains("4242"))
        } else { Issue.record("unknown exit must stop") }
    }

    @Test func kicksResume() {
        #expect(ExitHandler.decide(.interrupted) == .resume)
        #expect(ExitHandler.decide(.irqWindowOpen) == .resume)
    }

    @Test func cleanAndUncleanStops() {
        #expect(StopReason.powerOff.isClean && StopReason.halted.isClean)
        #expect(!StopReason.tripleFault.isClean && !StopReason.timeout.isClean && !StopReason.error("x").isClean)
    }
}

@Suite("x86 vCPU setup")
struct X86SetupTests {
    let supported: [CPUIDEntry] = [
        CPUIDEntry(function: 0, eax: 0xd, ebx: 0x6874_7541),
        CPUIDEntry(function: 1, eax: 0x00a0_0f11, ebx: 0xff08_0800, ecx: 0x0000_0020, edx: 0x1789_fbff),
        CPUIDEntry(function: 0xb, index: 0, flags: 1, eax: 1, ebx: 2, ecx: 0x100, edx: 7),
        CPUIDEntry(function: 0xb, index: 1, flags: 1, eax: 7, ebx: 64, ecx: 0x201, edx: 7),
        CPUIDEntry(function: 0xb, index: 2, flags: 1, eax: 0, ebx: 0, ecx: 2, edx: 7),
        CPUIDEntry(function: 0x8000_0001, ecx: 0x4),
        CPUIDEntry(function: 0x8000_0008, ecx: 0x3f),
    ]

    @Test func cpuidIsAdjustedPerVCPU() {
        let out = CPUIDPolicy.adjust(supported, vcpu: 2, count: 3)
        func leaf(_ f: UInt32, _ i: UInt32 = 0) -> CPUIDEntry? { out.first { $0.function == f && $0.index == i } }
        let l1 = leaf(1)!
        #expect(l1.ebx >> 24 == 2)                 // initial APIC id
        #expect((l1.ebx >> 16) & 0xff == 3)        // logical processors
        #expect(l1.ebx & 0xffff == 0x0800)         // CLFLUSH size kept
        #expect(l1.ecx & (1 << 31) != 0)           // hypervisor
        #expect(l1.ecx & (1 << 5) == 0)            // no VMX
        #expect(l1.edx & (1 << 28) != 0)           // HTT with 3 CPUs
        #expect(leaf(0xb, 0)!.edx == 2 && leaf(0xb, 0)!.ebx == 1 && leaf(0xb, 0)!.ecx == 0x100)
        #expect(leaf(0xb, 1)!.eax == 2 && leaf(0xb, 1)!.ebx == 3 && leaf(0xb, 1)!.ecx == 0x201)
        #expect(leaf(0xb, 2)!.ebx == 0 && leaf(0xb, 2)!.ecx == 2)
        #expect(leaf(0x8000_0001)!.ecx & 0x4 == 0) // no SVM
        #expect(leaf(0x8000_0008)!.ecx & 0xff == 2)
        let sig = leaf(0x4000_0000)!
        #expect(sig.ebx == 0x4b4d_564b && sig.ecx == 0x564b_4d56 && sig.edx == 0x4d && sig.eax >= 0x4000_0001)
        #expect(out.count == supported.count + 1)
    }

    @Test func singleVCPUHasNoHTT() {
        let l1 = CPUIDPolicy.adjust(supported, vcpu: 0, count: 1).first { $0.function == 1 }!
        #expect(l1.edx & (1 << 28) == 0 && l1.ebx >> 24 == 0 && (l1.ebx >> 16) & 0xff == 1)
    }

    @Test func bootMSRsMatchFirecracker() {
        let e = Dictionary(uniqueKeysWithValues: BootMSRs.entries.map { ($0.index, $0.value) })
        #expect(e.count == 11)
        #expect(e[0x1a0] == 1 && e[0x2ff] == 0x806 && e[0x10] == 0 && e[0xc000_0082] == 0)
        let filtered = BootMSRs.filtered(supported: [0x10, 0x174])
        #expect(Set(filtered.map(\.index)) == [0x10, 0x174, 0x2ff])
    }

    @Test func lapicLintDeliveryModes() {
        #expect(LAPICSetup.withDeliveryMode(0x0001_0000, LAPICSetup.deliveryModeExtINT) == 0x0001_0700)
        #expect(LAPICSetup.withDeliveryMode(0x0000_0700, LAPICSetup.deliveryModeNMI) == 0x0000_0400)
        var s = LAPICState()
        s.setRegister(LAPICState.lvtLINT0, 0x10000)
        LAPICSetup.configure(&s)
        #expect(s.register(LAPICState.lvtLINT0) == 0x10700 && s.register(LAPICState.lvtLINT1) == 0x400)
        #expect(s.register(2000) == 0)  // out of range reads as zero, never traps
    }

    @Test func bootRegistersPerMode() {
        let r = BootRegisters.registers(for: BootEntry(.long64(entry: 0x100_0000, bootParams: 0x7000)))
        #expect(r.rip == 0x100_0000 && r.rsi == 0x7000 && r.rflags == 2 && r.rsp == 0x8ff0)
        let p = BootRegisters.registers(for: BootEntry(.pvh32(entry: 0x100_0200, startInfo: 0x6000)))
        #expect(p.rip == 0x100_0200 && p.rbx == 0x6000)
        #expect(X86Layout.pvhGDT[1] == 0x00cf_9b00_0000_ffff && X86Layout.pvhGDT[3] == 0x0000_8b00_0000_0067)
    }
}
