import Testing
import Foundation
import MicroVMCore
import GuestMemory
@testable import LinuxBoot

@Suite("ELF vmlinux and PVH")
struct ElfPVHTests {
    @Test("a small ELF with a PVH note loads: segments, BSS, start_info, modlist, memmap")
    func smallELF() throws {
        let code = (0..<300).map { UInt8(truncatingIfNeeded: $0 &* 11) }
        let mem = try GuestRAM(size: .mebibytes(64))
        // Dirty the BSS range first so the test sees the loader zero it.
        try mem.writeBytes([UInt8](repeating: 0xcc, count: 4096), at: GuestAddress(0x100_0000 + 300))
        let initrd = [UInt8](repeating: 0x5a, count: 5000)
        let entry = try LinuxLoader.load(kernel: ImageBuffer(Fixture.elf(code: code)), initrd: ImageBuffer(initrd),
                                         cmdline: "console=ttyS0", memory: mem, cpus: 3)
        #expect(entry == KernelEntry(entry: 0x100_0040, mode: .pvh32(startInfo: 0x6000)))
        #expect(try mem.readBytes(at: 0x100_0000, count: 300) == code)
        #expect(try mem.readBytes(at: GuestAddress(0x100_0000 + 300), count: 4096) == [UInt8](repeating: 0, count: 4096))
        let si: UInt64 = 0x6000
        #expect(try mem.u32(si + 0) == 0x336e_c578)
        #expect(try mem.u32(si + 4) == 1)
        #expect(try mem.u32(si + 8) == 0)
        #expect(try mem.u32(si + 12) == 1)
        #expect(try mem.u64(si + 16) == Layout.pvhModlist.rawValue)
        #expect(try mem.u64(si + 24) == 0x20000)
        #expect(try mem.u64(si + 32) == 0, "no ACPI RSDP without virtio-mmio devices")
        #expect(try mem.u64(si + 40) == Layout.pvhMemmap.rawValue)
        #expect(try mem.u32(si + 48) == 3)
        #expect(try mem.readBytes(at: 0x20000, count: 14) == Array("console=ttyS0\0".utf8))
        let modAddr = try mem.u64(Layout.pvhModlist.rawValue)
        #expect(try mem.u64(Layout.pvhModlist.rawValue + 8) == 5000)
        #expect(modAddr % 4096 == 0 && modAddr >= 0x100_0000 + 300 + 4096 && modAddr + 5000 <= 64 << 20)
        #expect(try mem.readBytes(at: GuestAddress(modAddr), count: 5000) == initrd)
        let mm = Layout.pvhMemmap.rawValue
        #expect(try mem.u64(mm) == 0 && mem.u64(mm + 8) == 0x9fc00 && mem.u32(mm + 16) == 1)
        #expect(try mem.u64(mm + 24) == 0x9fc00 && mem.u32(mm + 40) == 2)
        #expect(try mem.u64(mm + 48) == 0x10_0000 && mem.u64(mm + 56) == (64 << 20) - 0x10_0000 && mem.u32(mm + 64) == 1)
    }

    @Test("a 4-byte PVH note value is read too, and no initrd means no modules")
    func shortNote() throws {
        let mem = try GuestRAM(size: .mebibytes(64))
        let entry = try LinuxLoader.load(kernel: ImageBuffer(Fixture.elf(pvhEntry: 0x123_4560, noteDescSize: 4)), initrd: nil,
                                         cmdline: "", memory: mem, cpus: 1)
        #expect(entry.entry == 0x123_4560)
        #expect(try mem.u32(0x6000 + 12) == 0)
        #expect(try mem.u64(0x6000 + 16) == 0)
    }

    @Test("ELF errors: no PVH note, wrong machine, segment past the file, below 1 MiB, past RAM")
    func elfErrors() throws {
        let mem = try GuestRAM(size: .mebibytes(64))
        func error(_ f: [UInt8]) -> MicroVMError? {
            #expect(throws: MicroVMError.self) {
                try LinuxLoader.load(kernel: ImageBuffer(f), initrd: nil, cmdline: "", memory: mem, cpus: 1)
            }
        }
        #expect(error(Fixture.elf(pvhEntry: nil))?.message.contains("no PVH entry") == true)
        #expect(error(Fixture.elf(machine: 3))?.message.contains("not x86-64") == true)
        var cut = Fixture.elf()
        cut.removeLast(10)
        #expect(error(cut)?.message.contains("truncated ELF") == true)
        #expect(error(Fixture.elf(paddr: 0x8000))?.message.contains("below 1 MiB") == true)
        #expect(error(Fixture.elf(paddr: 63 << 20, bss: 2 << 20))?.message.contains("does not fit") == true)
        var badNote = Fixture.elf()
        badNote.put(UInt32(0xffff_fff0), at: 64 + 56 * 2)  // first note's namesz
        #expect(error(badNote)?.message.contains("runs past") == true)
        var class32 = Fixture.elf()
        class32[4] = 1
        #expect(error(class32)?.message.contains("ELFCLASS64") == true)
    }

    @Test("the Debian vmlinux (extracted from the bzImage payload) has a PVH entry and loads",
          .enabled(if: Fixture.haveDebianKernel && Fixture.haveXZ, "needs \(Fixture.debianKernel) and /usr/bin/xz (Debian package xz-utils)"))
    func debianVmlinux() throws {
        let dir = try Fixture.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = try Fixture.extractVmlinux(into: dir)
        let file = try ImageFile(path: path)
        let elf = try ElfKernel(file)
        let pvh = try #require(elf.pvhEntry)
        #expect(UInt64(pvh) >= 0x100_0000 && UInt64(pvh) < elf.end)
        let mem = try GuestRAM(size: .mebibytes(256))
        let entry = try LinuxLoader.load(kernelPath: path, initrdPath: nil, cmdline: "console=ttyS0", memory: mem, cpus: 2)
        #expect(entry == KernelEntry(entry: GuestAddress(UInt64(pvh)), mode: .pvh32(startInfo: Layout.pvhStartInfo)))
        let first = try #require(elf.segments.first)
        #expect(try mem.readBytes(at: GuestAddress(first.physicalAddress), count: 256) == file.bytes(at: first.fileOffset, count: 256))
    }
}

@Suite("MP table")
struct MPTableTests {
    func sum(_ b: ArraySlice<UInt8>) -> UInt8 { b.reduce(0, &+) }

    @Test("checksums sum to zero and entry counts match", arguments: [1, 2, 4, 64, 254])
    func checksums(cpus: Int) throws {
        let mem = try GuestRAM(size: .mebibytes(4))
        try MPTable.write(cpus: cpus, memory: mem)
        let base: UInt64 = 0x9fc00
        let fp = try mem.readBytes(at: GuestAddress(base), count: 16)
        #expect(Array(fp[0..<4]) == Array("_MP_".utf8))
        #expect(sum(fp[...]) == 0)
        #expect(fp[8] == 1 && fp[9] == 4)
        let config = UInt64(fp.le(4, as: UInt32.self))
        #expect(config == base + 16)
        let len = Int(try mem.u16(config + 4))
        let table = try mem.readBytes(at: GuestAddress(config), count: len)
        #expect(Array(table[0..<4]) == Array("PCMP".utf8))
        #expect(sum(table[...]) == 0)
        #expect(len == MPTable.size(cpus: cpus) - 16)
        #expect(table.le(36, as: UInt32.self) == 0xfee0_0000)
        // Walk the entries: count per type, APIC ids, BSP flag.
        var at = 44
        var counts = [UInt8: Int]()
        var apicIDs: [UInt8] = []
        var pins: [UInt8] = []
        var ioapicID: UInt8?
        var lint: [(UInt8, UInt8)] = []
        while at < len {
            let type = table[at]
            counts[type, default: 0] += 1
            switch type {
            case 0:
                apicIDs.append(table[at + 1])
                #expect((table[at + 3] & 2 != 0) == (apicIDs.count == 1), "only the first CPU is the BSP")
                #expect(table[at + 3] & 1 == 1)
                at += 20
            case 2:
                ioapicID = table[at + 1]
                #expect(table.le(at + 4, as: UInt32.self) == 0xfec0_0000)
                at += 8
            case 3:
                #expect(table[at + 6] == UInt8(cpus), "destination: the IOAPIC")
                pins.append(table[at + 7])
                #expect(table[at + 4] == 0 && table[at + 5] == table[at + 7], "ISA bus IRQ i goes to pin i")
                at += 8
            case 4:
                lint.append((table[at + 1], table[at + 7]))
                at += 8
            default:
                at += 8
            }
        }
        #expect(at == len)
        #expect(table.le(34, as: UInt16.self) == UInt16(counts.values.reduce(0, +)))
        #expect(apicIDs == (0..<cpus).map { UInt8($0) })
        #expect(counts[1] == 1)
        #expect(ioapicID == UInt8(cpus))
        #expect(pins == (0..<24).map { UInt8($0) })
        #expect(lint.count == 2 && lint[0] == (3, 0) && lint[1] == (1, 1))
    }

    @Test("vCPU counts outside 1...254 are refused")
    func bounds() throws {
        let mem = try GuestRAM(size: .mebibytes(4))
        #expect(throws: MicroVMError.self) { try MPTable.write(cpus: 0, memory: mem) }
        #expect(throws: MicroVMError.self) { try MPTable.write(cpus: 255, memory: mem) }
    }
}

@Suite("hostile kernels")
struct HostileKernelTests {
    typealias Rng = SeededGenerator

    static func tryLoad(_ bytes: [UInt8], memory: GuestRAM) {
        do {
            _ = try LinuxLoader.load(kernel: ImageBuffer(bytes), initrd: ImageBuffer([1, 2, 3]), cmdline: "x", memory: memory, cpus: 2)
        } catch let e as MicroVMError {
            #expect(!e.message.isEmpty)
        } catch {
            Issue.record("loader threw a non-MicroVMError: \(error)")
        }
    }

    @Test("random bytes, and bzImage/ELF headers with random fields, never trap")
    func randomKernels() throws {
        var rng = Rng(state: 0x5eed)
        let mem = try GuestRAM(size: .mebibytes(64))
        let bz = Fixture.bzImage()
        let elf = Fixture.elf()
        for round in 0..<800 {
            var f: [UInt8]
            switch round % 4 {
            case 3:
                // Extreme values in the numeric fields a loader does arithmetic with.
                let fields: [(Int, Int)] = [(0x1f1, 1), (0x1f4, 4), (0x201, 1), (0x22c, 4), (0x230, 4), (0x234, 1),
                                            (0x238, 4), (0x248, 4), (0x24c, 4), (0x258, 8), (0x260, 4)]
                f = bz
                for _ in 0..<(1 + rng.below(3)) {
                    let (at, size) = fields[rng.below(fields.count)]
                    let fill: UInt8 = [0x00, 0xff, rng.byte()][rng.below(3)]
                    for i in 0..<size { f[at + i] = fill }
                    if rng.below(2) == 0 { f[at + size - 1] = 0x7f }
                }
            case 0:
                f = (0..<rng.below(12_000)).map { _ in rng.byte() }
                if rng.below(2) == 0 && f.count > 0x210 {
                    f.replaceSubrange(0x1fe..<0x200, with: [0x55, 0xaa])
                    f.replaceSubrange(0x202..<0x206, with: Array("HdrS".utf8))
                    f.replaceSubrange(0x206..<0x208, with: [0x0f, 0x02])
                }
            case 1:
                f = bz
                for _ in 0..<(1 + rng.below(8)) { f[0x1f1 + rng.below(0x80)] = rng.byte() }
            default:
                f = elf
                for _ in 0..<(1 + rng.below(8)) { f[rng.below(min(f.count, 300))] = rng.byte() }
            }
            if rng.below(4) == 0 { f.removeLast(rng.below(f.count + 1)) }
            Self.tryLoad(f, memory: mem)
        }
    }
}
