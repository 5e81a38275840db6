import CKVM
#if canImport(Glibc)
import Glibc
#endif

/// The x86_64 pieces a vCPU needs to start in 64-bit long mode: a flat GDT, identity-mapped
/// page tables built from 2 MiB pages, and the control-register values. Pure values; the caller
/// writes them into guest memory (this module knows no guest-memory type).
public enum X86LongMode {
    /// Packs a GDT descriptor the way the SDM lays it out (flags = access byte | G/DB/L/AVL nibble << 12).
    public static func gdtEntry(flags: UInt16, base: UInt32, limit: UInt32) -> UInt64 {
        let b = UInt64(base), l = UInt64(limit), f = UInt64(flags)
        return ((b & 0xff00_0000) << (56 - 24)) | ((f & 0x0000_f0ff) << 40) | ((l & 0x000f_0000) << (48 - 16))
            | ((b & 0x00ff_ffff) << 16) | (l & 0x0000_ffff)
    }

    /// Null, 64-bit code (selector 0x08), data (0x10) and a TSS (0x18), as Linux's boot code expects.
    public static let gdt: [UInt64] = [
        gdtEntry(flags: 0, base: 0, limit: 0),
        gdtEntry(flags: 0xa09b, base: 0, limit: 0xfffff),
        gdtEntry(flags: 0xc093, base: 0, limit: 0xfffff),
        gdtEntry(flags: 0x808b, base: 0, limit: 0xfffff),
    ]
    public static let codeSelector: UInt16 = 0x08
    public static let dataSelector: UInt16 = 0x10
    public static let tssSelector: UInt16 = 0x18

    /// Unpacks a descriptor into the form KVM_SET_SREGS takes.
    public static func segment(fromGDT entry: UInt64, index: Int) -> kvm_segment {
        var s = kvm_segment()
        s.base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000)
        let g = (entry >> 55) & 1
        let rawLimit = UInt32(((entry >> 32) & 0x000f_0000) | (entry & 0xffff))
        s.limit = g == 1 ? (rawLimit << 12) | 0xfff : rawLimit
        s.selector = UInt16(index * 8)
        s.type = UInt8((entry >> 40) & 0xf)
        s.present = UInt8((entry >> 47) & 1)
        s.dpl = UInt8((entry >> 45) & 3)
        s.db = UInt8((entry >> 54) & 1)
        s.s = UInt8((entry >> 44) & 1)
        s.l = UInt8((entry >> 53) & 1)
        s.g = UInt8(g)
        s.avl = UInt8((entry >> 52) & 1)
        s.unusable = s.present == 0 ? 1 : 0
        return s
    }

    // Control-register bits (SDM vol. 3, 2.5).
    public static let cr0PE: UInt64 = 1 << 0, cr0MP: UInt64 = 1 << 1, cr0ET: UInt64 = 1 << 4
    public static let cr0NE: UInt64 = 1 << 5, cr0WP: UInt64 = 1 << 16, cr0AM: UInt64 = 1 << 18, cr0PG: UInt64 = 1 << 31
    public static let cr4PAE: UInt64 = 1 << 5
    public static let eferLME: UInt64 = 1 << 8, eferLMA: UInt64 = 1 << 10

    /// CR0 for long mode: protection, paging, native FPU errors, write-protect.
    public static let cr0 = cr0PE | cr0MP | cr0ET | cr0NE | cr0WP | cr0AM | cr0PG
    public static let cr4 = cr4PAE
    public static let efer = eferLME | eferLMA

    /// Where the page tables go and how much they map.
    public struct PageTables: Sendable, Equatable {
        public var pml4: UInt64
        public var pdpt: UInt64
        /// First page directory; the others follow at 4 KiB steps.
        public var firstPD: UInt64
        /// GiB identity-mapped from 0 (one page directory of 512 × 2 MiB pages each).
        public var gibibytes: Int

        public init(pml4: UInt64 = 0x9000, pdpt: UInt64 = 0xa000, firstPD: UInt64 = 0xb000, gibibytes: Int = 4) {
            self.pml4 = pml4; self.pdpt = pdpt; self.firstPD = firstPD; self.gibibytes = max(1, min(gibibytes, 512))
        }

        /// (guest address, 64-bit entry) pairs to write: present + writable tables, 2 MiB leaf pages.
        public var entries: [(address: UInt64, value: UInt64)] {
            var out: [(UInt64, UInt64)] = [(pml4, pdpt | 0x3)]
            for g in 0..<gibibytes {
                let pd = firstPD + UInt64(g) * 0x1000
                out.append((pdpt + UInt64(g) * 8, pd | 0x3))
                for i in 0..<512 {
                    let phys = (UInt64(g) << 30) | (UInt64(i) << 21)
                    out.append((pd + UInt64(i) * 8, phys | 0x83))  // present, writable, page size
                }
            }
            return out
        }

        /// The guest range the tables occupy.
        public var footprint: ClosedRange<UInt64> {
            let ends = [pml4, pdpt, firstPD + UInt64(gibibytes - 1) * 0x1000].map { $0 + 0xfff }
            return min(pml4, pdpt, firstPD)...ends.max()!
        }
    }

    /// Fills `sregs` for 64-bit mode with the flat GDT at `gdtAddress` and paging rooted at `pml4`.
    public static func configure(_ sregs: inout kvm_sregs, gdtAddress: UInt64, idtAddress: UInt64, pml4: UInt64) {
        let code = segment(fromGDT: gdt[1], index: 1)
        let data = segment(fromGDT: gdt[2], index: 2)
        let tss = segment(fromGDT: gdt[3], index: 3)
        sregs.gdt.base = gdtAddress
        sregs.gdt.limit = UInt16(gdt.count * 8 - 1)
        sregs.idt.base = idtAddress
        sregs.idt.limit = 0
        sregs.cs = code
        sregs.ds = data; sregs.es = data; sregs.fs = data; sregs.gs = data; sregs.ss = data
        sregs.tr = tss
        sregs.cr0 = cr0
        sregs.cr3 = pml4
        sregs.cr4 = cr4
        sregs.efer = efer
    }
}

/// Interrupts a thread blocked in KVM_RUN: a no-op handler for one signal, installed once, so
/// that `pthread_kill` makes the ioctl return EINTR instead of killing the process.
public enum VCPUKick {
    /// SIGUSR2: nothing else in the project uses it; real-time signals are not importable as constants.
    public static let signal = SIGUSR2

    private static let installed: Bool = {
        var sa = sigaction()
        sa.__sigaction_handler.sa_handler = { _ in }
        sigemptyset(&sa.sa_mask)
        sa.sa_flags = 0
        return sigaction(signal, &sa, nil) == 0
    }()

    /// Installs the handler (idempotent). Call before starting vCPU threads.
    public static func install() { _ = installed }

    /// Unblocks the kick signal on the calling thread and returns the previous mask. Threads
    /// spawned from Dispatch or Swift concurrency workers inherit a mask that blocks it, and a
    /// blocked kick never interrupts KVM_RUN.
    @discardableResult
    public static func unblockOnCurrentThread() -> sigset_t {
        install()
        var set = sigset_t(), old = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, signal)
        pthread_sigmask(SIG_UNBLOCK, &set, &old)
        return old
    }

    /// Restores a mask saved by `unblockOnCurrentThread`.
    public static func restoreMask(_ old: sigset_t) {
        var o = old
        pthread_sigmask(SIG_SETMASK, &o, nil)
    }

    public static func kick(_ vcpu: KVMVCPU, thread: pthread_t) {
        install()
        vcpu.requestImmediateExit()
        pthread_kill(thread, signal)
    }
}
