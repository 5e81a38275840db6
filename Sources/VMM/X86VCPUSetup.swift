import CKVM
import KVM

/// Where and how the boot vCPU starts. The boot engineer's `KernelEntry` converts to this; tiny
/// test guests build one directly.
public struct BootEntry: Sendable, Equatable {
    public enum Mode: Sendable, Equatable {
        /// 16-bit real mode at `segment:offset` (test guests).
        case real(segment: UInt16, offset: UInt16)
        /// 64-bit long mode, paging on (our identity map), RSI = `bootParams` (Linux 64-bit boot protocol).
        case long64(entry: UInt64, bootParams: UInt64)
        /// 32-bit protected mode, paging off, EBX = `startInfo` (Xen PVH boot ABI).
        case pvh32(entry: UInt64, startInfo: UInt64)
    }
    public var mode: Mode
    public var stackPointer: UInt64
    public init(_ mode: Mode, stackPointer: UInt64 = 0x8ff0) { self.mode = mode; self.stackPointer = stackPointer }
}

/// Guest physical addresses of the x86 boot structures (the same ones the boot engineer's
/// `Layout` uses; Firecracker's values).
public enum X86Layout {
    public static let gdt: UInt64 = 0x500
    public static let idt: UInt64 = 0x520
    public static let pageTables = X86LongMode.PageTables(pml4: 0x9000, pdpt: 0xa000, firstPD: 0xb000, gibibytes: 4)
    /// Three pages KVM needs for real-mode emulation on Intel, just below the BIOS area.
    public static let tssAddress: UInt64 = 0xfffb_d000
    public static let identityMapAddress: UInt64 = 0xfffb_c000

    /// The PVH boot ABI wants flat 32-bit segments (D/B set, L clear) and a TSS with a 0x67 limit.
    public static let pvhGDT: [UInt64] = [
        X86LongMode.gdtEntry(flags: 0, base: 0, limit: 0),
        X86LongMode.gdtEntry(flags: 0xc09b, base: 0, limit: 0xffff_ffff),
        X86LongMode.gdtEntry(flags: 0xc093, base: 0, limit: 0xffff_ffff),
        X86LongMode.gdtEntry(flags: 0x008b, base: 0, limit: 0x67),
    ]
}

/// The CPUID a vCPU sees: what KVM supports, made consistent per vCPU.
public enum CPUIDPolicy {
    /// "KVMKVMKVM\0\0\0" in EBX, ECX, EDX, so the guest finds KVM's paravirtual clock.
    public static let kvmSignature: (UInt32, UInt32, UInt32) = (0x4b4d_564b, 0x564b_4d56, 0x0000_004d)

    public static func adjust(_ supported: [CPUIDEntry], vcpu: Int, count: Int) -> [CPUIDEntry] {
        let apicID = UInt32(vcpu & 0xff)
        let n = UInt32(max(1, min(count, 255)))
        // Bits needed to number `n` cores in an x2APIC id (leaf 0xB level 1 shift).
        var coreBits: UInt32 = 0
        while (1 << coreBits) < n { coreBits += 1 }
        var out: [CPUIDEntry] = []
        var haveSignature = false
        for var e in supported {
            switch e.function {
            case 1:
                e.ebx = (e.ebx & 0x0000_ffff) | (n << 16) | (apicID << 24)
                e.ecx |= 1 << 31           // running under a hypervisor
                e.ecx &= ~(UInt32(1) << 5) // no VMX for the guest
                if n > 1 { e.edx |= 1 << 28 } else { e.edx &= ~(UInt32(1) << 28) }  // HTT: more than one logical CPU
            case 0xb:
                e.edx = apicID
                switch e.index {
                case 0: e.eax = 0; e.ebx = 1; e.ecx = (1 << 8) | 0          // SMT level: one thread per core
                case 1: e.eax = coreBits; e.ebx = n; e.ecx = (2 << 8) | 1  // core level: n cores
                default: e.eax = 0; e.ebx = 0; e.ecx = e.index & 0xff      // invalid level ends the list
                }
            case 0x4000_0000:
                haveSignature = true
                e.eax = max(e.eax, 0x4000_0001)
                (e.ebx, e.ecx, e.edx) = kvmSignature
            case 0x8000_0001:
                e.ecx &= ~(UInt32(1) << 2) // no SVM for the guest
            case 0x8000_0008:
                e.ecx = (e.ecx & ~0xff) | (n - 1)  // AMD: cores per package - 1
            default:
                break
            }
            out.append(e)
        }
        if !haveSignature {
            out.append(CPUIDEntry(function: 0x4000_0000, eax: 0x4000_0001, ebx: kvmSignature.0, ecx: kvmSignature.1, edx: kvmSignature.2))
        }
        return out
    }
}

/// MSR values a vCPU starts with (Firecracker's `create_boot_msr_entries`).
public enum BootMSRs {
    public static let sysenterCS: UInt32 = 0x174, sysenterESP: UInt32 = 0x175, sysenterEIP: UInt32 = 0x176
    public static let star: UInt32 = 0xc000_0081, lstar: UInt32 = 0xc000_0082, cstar: UInt32 = 0xc000_0083
    public static let syscallMask: UInt32 = 0xc000_0084, kernelGSBase: UInt32 = 0xc000_0102
    public static let tsc: UInt32 = 0x10, miscEnable: UInt32 = 0x1a0, mtrrDefType: UInt32 = 0x2ff

    public static let entries: [MSREntry] = [
        MSREntry(index: sysenterCS, value: 0), MSREntry(index: sysenterESP, value: 0), MSREntry(index: sysenterEIP, value: 0),
        MSREntry(index: star, value: 0), MSREntry(index: cstar, value: 0), MSREntry(index: kernelGSBase, value: 0),
        MSREntry(index: syscallMask, value: 0), MSREntry(index: lstar, value: 0), MSREntry(index: tsc, value: 0),
        MSREntry(index: miscEnable, value: 1),            // fast strings
        MSREntry(index: mtrrDefType, value: 0x800 | 0x6), // MTRRs on, default write-back
    ]

    /// The entries KVM can save and restore on this host; an MSR missing from `supported` would
    /// make KVM_SET_MSRS stop early.
    public static func filtered(supported: [UInt32]) -> [MSREntry] {
        let s = Set(supported)
        return entries.filter { s.contains($0.index) || $0.index == mtrrDefType }
    }
}

/// Local APIC settings for the boot: LINT0 delivers the PIC's ExtINT, LINT1 delivers NMI.
public enum LAPICSetup {
    public static let deliveryModeExtINT: UInt32 = 7, deliveryModeNMI: UInt32 = 4

    public static func withDeliveryMode(_ reg: UInt32, _ mode: UInt32) -> UInt32 {
        (reg & ~0x700) | (mode << 8)
    }

    public static func configure(_ s: inout LAPICState) {
        s.setRegister(LAPICState.lvtLINT0, withDeliveryMode(s.register(LAPICState.lvtLINT0), deliveryModeExtINT))
        s.setRegister(LAPICState.lvtLINT1, withDeliveryMode(s.register(LAPICState.lvtLINT1), deliveryModeNMI))
    }
}

/// Register values for the boot vCPU.
enum BootRegisters {
    static func registers(for entry: BootEntry) -> kvm_regs {
        var r = kvm_regs()
        r.rflags = 0x2
        r.rsp = entry.stackPointer
        r.rbp = entry.stackPointer
        switch entry.mode {
        case .real(_, let offset): r.rip = UInt64(offset)
        case .long64(let rip, let bootParams): r.rip = rip; r.rsi = bootParams
        case .pvh32(let eip, let startInfo): r.rip = eip; r.rbx = startInfo
        }
        return r
    }

    static func configure(_ s: inout kvm_sregs, for entry: BootEntry) {
        switch entry.mode {
        case .real(let segment, _):
            s.cs.selector = segment
            s.cs.base = UInt64(segment) << 4
        case .long64:
            X86LongMode.configure(&s, gdtAddress: X86Layout.gdt, idtAddress: X86Layout.idt, pml4: X86Layout.pageTables.pml4)
        case .pvh32:
            let gdt = X86Layout.pvhGDT
            let code = X86LongMode.segment(fromGDT: gdt[1], index: 1)
            let data = X86LongMode.segment(fromGDT: gdt[2], index: 2)
            s.gdt.base = X86Layout.gdt; s.gdt.limit = UInt16(gdt.count * 8 - 1)
            s.idt.base = X86Layout.idt; s.idt.limit = 0
            s.cs = code
            s.ds = data; s.es = data; s.fs = data; s.gs = data; s.ss = data
            s.tr = X86LongMode.segment(fromGDT: gdt[3], index: 3)
            s.cr0 = X86LongMode.cr0PE
            s.cr4 = 0
            s.efer = 0
        }
    }
}
