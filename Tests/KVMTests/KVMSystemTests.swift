import Foundation
import Testing
@testable import KVM
import MicroVMCore

let hasKVM = FileManager.default.isWritableFile(atPath: "/dev/kvm")

@Suite("X86 long-mode layout")
struct X86LongModeTests {
    @Test func gdtEntriesAreBitExact() {
        #expect(X86LongMode.gdt == [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x008f_8b00_0000_ffff])
        #expect(X86LongMode.gdtEntry(flags: 0x4092, base: 0x1234_5678, limit: 0xabcde) == 0x124a_9234_5678_bcde)
    }

    @Test func segmentsDecodeFromDescriptors() {
        let cs = X86LongMode.segment(fromGDT: X86LongMode.gdt[1], index: 1)
        #expect(cs.selector == 0x08 && cs.type == 0xb && cs.l == 1 && cs.db == 0 && cs.g == 1 && cs.present == 1 && cs.s == 1)
        #expect(cs.limit == 0xffff_ffff && cs.base == 0 && cs.unusable == 0)
        let ds = X86LongMode.segment(fromGDT: X86LongMode.gdt[2], index: 2)
        #expect(ds.selector == 0x10 && ds.type == 3 && ds.db == 1 && ds.l == 0)
        let tss = X86LongMode.segment(fromGDT: X86LongMode.gdt[3], index: 3)
        #expect(tss.type == 0xb && tss.s == 0 && tss.selector == 0x18)
        let null = X86LongMode.segment(fromGDT: 0, index: 0)
        #expect(null.unusable == 1)
    }

    @Test func pageTablesIdentityMapWith2MiBPages() {
        let t = X86LongMode.PageTables(pml4: 0x9000, pdpt: 0xa000, firstPD: 0xb000, gibibytes: 2)
        let e = Dictionary(uniqueKeysWithValues: t.entries.map { ($0.address, $0.value) })
        #expect(e.count == 1 + 2 + 1024)
        #expect(e[0x9000] == 0xa003)
        #expect(e[0xa000] == 0xb003 && e[0xa008] == 0xc003)
        #expect(e[0xb000] == 0x83 && e[0xb008] == 0x20_0083)
        #expect(e[0xc000 + 511 * 8] == (UInt64(2) << 30) - (2 << 20) | 0x83)
        #expect(t.footprint == 0x9000...0xcfff)
        #expect(X86LongMode.cr0 == 0x8005_0033 && X86LongMode.cr4 == 0x20 && X86LongMode.efer == 0x500)
    }
}

@Suite("KVM system", .enabled(if: hasKVM, "no writable /dev/kvm on this host"))
struct KVMSystemTests {
    @Test func opensAndReportsCapabilities() throws {
        let kvm = try KVMSystem()
        #expect(kvm.apiVersion == 12)
        #expect(try kvm.vcpuMmapSize() >= 4096)
        #expect(kvm.check(.userMemory) > 0)
        let cpuid = try kvm.supportedCPUID()
        #expect(cpuid.contains { $0.function == 0 })
        #expect(cpuid.contains { $0.function == 1 })
        let msrs = try kvm.msrIndexList()
        #expect(msrs.contains(0x10))  // IA32_TSC is always saved/restored
    }

    @Test func missingDeviceSaysWhatToLoad() {
        #expect {
            _ = try KVMSystem(path: "/dev/kvm-does-not-exist")
        } throws: { e in
            "\(e)".contains("kvm_intel") && (e as? MicroVMError)?.code == .unsupported
        }
    }

    @Test func probeGivesAVerdictQuickly() {
        let start = Date()
        let r = KVMFunctionalProbe.run()
        print("KVM probe: \(r.verdict) — \(r.reason)")
        #expect(r.verdict != .absent)
        #expect(r.apiVersion == 12)
        #expect(Date().timeIntervalSince(start) < 5)
        if r.verdict == .hardware { #expect(r.cmpxchg16bWorks == true) }
        if r.verdict == .emulated { #expect(!r.reason.isEmpty) }
    }

    @Test func absentDeviceProbesAbsent() {
        let r = KVMFunctionalProbe.run(devicePath: "/nonexistent/kvm")
        #expect(r.verdict == .absent)
        #expect(r.reason.contains("load kvm"))
    }
}

@Suite("vCPU kick", .enabled(if: hasKVM, "no writable /dev/kvm on this host"), .timeLimit(.minutes(1)))
struct VCPUKickTests {
    @Test func watchdogEndsASpinningGuest() throws {
        let kvm = try KVMSystem()
        let vm = try kvm.createVM()
        try vm.setTSSAddress(0xfffb_d000)
        let size = 1 << 20
        let mem = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 4096)
        defer { mem.deallocate() }
        mem.initializeMemory(as: UInt8.self, repeating: 0, count: size)
        (mem + 0x1000).storeBytes(of: 0xfeeb, as: UInt16.self)  // jmp .
        try vm.setUserMemoryRegion(slot: 0, guestAddress: 0, size: UInt64(size), host: mem)
        let vcpu = try vm.createVCPU(id: 0)
        var s = try vcpu.specialRegisters()
        s.cs.base = 0; s.cs.selector = 0
        try vcpu.setSpecialRegisters(s)
        var r = try vcpu.registers()
        r.rip = 0x1000; r.rflags = 2
        try vcpu.setRegisters(r)
        let mask = VCPUKick.unblockOnCurrentThread()
        defer { VCPUKick.restoreMask(mask) }
        let dog = Watchdog(vcpu: vcpu, seconds: 0.2)
        defer { dog.cancel() }
        #expect(try vcpu.run() == .interrupted)
        #expect(try vcpu.registers().rip == 0x1000)
    }
}

@Suite("Event fds", .enabled(if: hasKVM, "no writable /dev/kvm on this host"), .timeLimit(.minutes(1)))
struct EventFDTests {
    @Test func ioeventfdTakesAPortWriteWithoutAnExit() throws {
        let kvm = try KVMSystem()
        let vm = try kvm.createVM()
        try vm.setTSSAddress(0xfffb_d000)
        let size = 1 << 20
        let mem = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 4096)
        defer { mem.deallocate() }
        mem.initializeMemory(as: UInt8.self, repeating: 0, count: size)
        let code: [UInt8] = [0xba, 0x00, 0x05, 0xb0, 0x07, 0xee, 0xe6, 0x10, 0xf4]  // mov dx,0x500; mov al,7; out dx,al; out 0x10,al; hlt
        code.withUnsafeBytes { (mem + 0x1000).copyMemory(from: $0.baseAddress!, byteCount: code.count) }
        try vm.setUserMemoryRegion(slot: 0, guestAddress: 0, size: UInt64(size), host: mem)
        let notify = try EventFD(nonBlocking: true)
        try vm.registerIOEventFD(notify, address: 0x500, length: 1, pio: true, datamatch: 7)
        let vcpu = try vm.createVCPU(id: 0)
        var s = try vcpu.specialRegisters()
        s.cs.base = 0; s.cs.selector = 0
        try vcpu.setSpecialRegisters(s)
        var r = try vcpu.registers()
        r.rip = 0x1000; r.rflags = 2
        try vcpu.setRegisters(r)
        #expect(notify.consume() == nil)
        let first = try vcpu.run()
        #expect(first == .portOut(port: 0x10, size: 1, count: 1, data: [7]))  // the 0x500 write never exited
        #expect(notify.consume() == 1)
        #expect(try vcpu.run() == .halt)
    }

    @Test func irqfdRegistersOnTheInKernelIRQChip() throws {
        let vm = try KVMSystem().createVM()
        let line = try EventFD()
        #expect(throws: MicroVMError.self) { try vm.registerIRQFD(line, gsi: 5) }  // no irqchip yet
        try vm.createIRQChip()
        try vm.registerIRQFD(line, gsi: 5)
        line.signal()
        try vm.unregisterIRQFD(line, gsi: 5)
    }
}
