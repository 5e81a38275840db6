import Testing
import Foundation
import MicroVMCore
import GuestMemory
@testable import LinuxBoot

@Suite("bzImage and boot_params")
struct BzImageTests {
    @Test("boot_params offsets match Documentation/arch/x86/boot.rst and bootparam.h")
    func offsets() {
        #expect(BootParams.setupSects == 0x1f1)
        #expect(BootParams.syssize == 0x1f4)
        #expect(BootParams.bootFlag == 0x1fe)
        #expect(BootParams.header == 0x202)
        #expect(BootParams.version == 0x206)
        #expect(BootParams.typeOfLoader == 0x210)
        #expect(BootParams.loadflags == 0x211)
        #expect(BootParams.code32Start == 0x214)
        #expect(BootParams.ramdiskImage == 0x218)
        #expect(BootParams.ramdiskSize == 0x21c)
        #expect(BootParams.heapEndPtr == 0x224)
        #expect(BootParams.cmdLinePtr == 0x228)
        #expect(BootParams.initrdAddrMax == 0x22c)
        #expect(BootParams.kernelAlignment == 0x230)
        #expect(BootParams.relocatableKernel == 0x234)
        #expect(BootParams.xloadflags == 0x236)
        #expect(BootParams.cmdlineSize == 0x238)
        #expect(BootParams.payloadOffset == 0x248)
        #expect(BootParams.payloadLength == 0x24c)
        #expect(BootParams.prefAddress == 0x258)
        #expect(BootParams.initSize == 0x260)
        #expect(BootParams.extRamdiskImage == 0x0c0)
        #expect(BootParams.extRamdiskSize == 0x0c4)
        #expect(BootParams.extCmdLinePtr == 0x0c8)
        #expect(BootParams.e820Entries == 0x1e8)
        #expect(BootParams.e820Table == 0x2d0)
        #expect(BootParams.e820EntrySize == 20)
        // The e820 table (128 entries) ends exactly where boot_params' next field starts (0xcd0).
        #expect(BootParams.e820Table + BootParams.e820MaxEntries * BootParams.e820EntrySize == 0xcd0)
        #expect(BootParams.headerMagic.littleEndian == 0x5372_6448)
        #expect(Array("HdrS".utf8) == withUnsafeBytes(of: BootParams.headerMagic.littleEndian) { Array($0) })
    }

    @Test("layout addresses do not overlap")
    func layout() {
        #expect(Layout.pvhStartInfo.rawValue + UInt64(PVHStartInfo.size) <= Layout.pvhModlist.rawValue)
        #expect(Layout.pvhModlist.rawValue + UInt64(PVHStartInfo.modlistEntrySize) <= Layout.pvhMemmap.rawValue)
        #expect(Layout.pvhMemmapCapacity >= 8)
        #expect(Layout.zeroPage.rawValue + UInt64(BootParams.size) <= Layout.bootStack.rawValue + 16)
        #expect(Layout.bootStack.rawValue < Layout.pml4.rawValue)
        #expect(Layout.cmdline.rawValue + UInt64(Layout.cmdlineRegionSize) <= Layout.mpTable.rawValue)
        #expect(UInt64(Layout.mpTable.rawValue) + UInt64(MPTable.size(cpus: MPTable.maxCPUs)) <= Layout.highMemoryStart)
        #expect(Layout.virtioMMIOBase.rawValue >= Layout.mmioHoleStart)
        #expect(Layout.virtioMMIOBase.rawValue + Layout.virtioMMIOSize <= Layout.ioapic.rawValue)
    }

    @Test("a synthesized bzImage loads: kernel at 1 MiB, zero page, cmdline, initrd, e820")
    func synthesized() throws {
        let kernel = Fixture.bzImage()
        let mem = try GuestRAM(size: .mebibytes(64))
        let initrd = (0..<10_000).map { UInt8(truncatingIfNeeded: $0 &* 13) }
        let entry = try LinuxLoader.load(kernel: ImageBuffer(kernel), initrd: ImageBuffer(initrd), cmdline: "console=ttyS0 reboot=k", memory: mem, cpus: 2)
        #expect(entry == KernelEntry(entry: 0x10_0200, mode: .long64(bootParams: 0x7000)))
        let pm = 5 * 512
        #expect(try mem.readBytes(at: 0x10_0000, count: kernel.count - pm) == Array(kernel[pm...]))
        let zp: UInt64 = 0x7000
        // The setup header is copied verbatim from 0x1f1 to its end (0x202 + byte at 0x201) ...
        let copied = try mem.readBytes(at: GuestAddress(zp + 0x1f1), count: 0x26c - 0x1f1)
        var expected = Array(kernel[0x1f1..<0x26c])
        // ... except the fields the loader fills in.
        expected[0x210 - 0x1f1] = 0xff
        expected[0x211 - 0x1f1] |= 0x80
        expected.put(UInt16(0xfe00), at: 0x224 - 0x1f1)
        expected.put(UInt32(0x20000), at: 0x228 - 0x1f1)
        let ramdisk = try mem.u32(zp + 0x218)
        expected.put(ramdisk, at: 0x218 - 0x1f1)
        expected.put(UInt32(initrd.count), at: 0x21c - 0x1f1)
        #expect(copied == expected)
        #expect(try mem.u8(zp + 0x1ef) == 0, "sentinel must stay zero or the kernel wipes the header")
        #expect(try mem.u32(zp + 0x228) == 0x20000)
        #expect(try mem.readBytes(at: 0x20000, count: 23) == Array("console=ttyS0 reboot=k\0".utf8))
        #expect(ramdisk % 4096 == 0)
        #expect(UInt64(ramdisk) + UInt64(initrd.count) <= 64 << 20)
        #expect(UInt64(ramdisk) >= 18 << 20, "initrd must stay clear of [16 MiB, 16 MiB + init_size)")
        #expect(try mem.readBytes(at: GuestAddress(UInt64(ramdisk)), count: initrd.count) == initrd)
        #expect(try mem.u32(zp + 0xc0) == 0)
        // e820: RAM [0, 0x9fc00), reserved [0x9fc00, 1 MiB), RAM [1 MiB, 64 MiB).
        #expect(try mem.u8(zp + 0x1e8) == 3)
        let e820: [(UInt64, UInt64, UInt32)] = try (0..<3).map { i in
            let a = zp + 0x2d0 + UInt64(i * 20)
            return (try mem.u64(a), try mem.u64(a + 8), try mem.u32(a + 16))
        }
        #expect(e820[0] == (0, 0x9fc00, 1))
        #expect(e820[1] == (0x9fc00, 0x100000 - 0x9fc00, 2))
        #expect(e820[2] == (0x100000, (64 << 20) - 0x100000, 1))
        #expect(try mem.readBytes(at: Layout.mpTable, count: 4) == Array("_MP_".utf8))
    }

    @Test("the Debian kernel loads and its header fields land in the zero page",
          .enabled(if: Fixture.haveDebianKernel, "needs \(Fixture.debianKernel) (Debian package linux-image-amd64)"))
    func debianKernel() throws {
        let file = try ImageFile(path: Fixture.debianKernel)
        let bz = try BzImage(file)
        #expect(bz.version >= 0x020c)
        #expect(bz.xloadflags.contains(.kernel64))
        #expect(bz.relocatable)
        #expect(bz.kernelAlignment == 0x20_0000)
        #expect(bz.cmdlineSize == 2047)
        #expect(bz.protectedModeOffset == UInt64(bz.setupSects + 1) * 512)
        #expect(bz.protectedModeOffset + bz.protectedModeSize == file.size)

        let mem = try GuestRAM(size: .mebibytes(256))
        let initrd = [UInt8](repeating: 0xa5, count: 3 << 20)
        let cmdline = "console=ttyS0 reboot=k panic=-1 mvm.cmd=" + GuestProtocol.encodeCommand(["uname", "-r"])
        let entry = try LinuxLoader.load(kernel: file, initrd: ImageBuffer(initrd), cmdline: cmdline, memory: mem, cpus: 4)
        #expect(entry.entry == 0x10_0200)
        #expect(entry.mode == .long64(bootParams: Layout.zeroPage))
        let zp: UInt64 = 0x7000
        #expect(try mem.u16(zp + 0x1fe) == 0xaa55)
        #expect(try mem.u32(zp + 0x202) == 0x5372_6448)
        #expect(try mem.u16(zp + 0x206) == bz.version)
        #expect(try mem.u8(zp + 0x1f1) == UInt8(bz.setupSects))
        #expect(try mem.u8(zp + 0x210) == 0xff)
        #expect(try mem.u8(zp + 0x211) & 0x81 == 0x81)
        #expect(try mem.u32(zp + 0x228) == 0x20000)
        #expect(try mem.u32(zp + 0x21c) == UInt32(initrd.count))
        let ramdisk = UInt64(try mem.u32(zp + 0x218))
        #expect(ramdisk >= bz.kernelEnd && ramdisk + UInt64(initrd.count) <= 256 << 20)
        #expect(try mem.u8(zp + 0x1e8) == 3)
        let last = zp + 0x2d0 + 40
        #expect(try mem.u64(last + 8) == (256 << 20) - 0x100000)
        // The first bytes at 1 MiB are the file's protected-mode code (startup_32).
        let head = try file.bytes(at: bz.protectedModeOffset, count: 4096)
        #expect(try mem.readBytes(at: 0x10_0000, count: 4096) == head)
        #expect(try mem.readBytes(at: 0x20000, count: cmdline.utf8.count + 1) == Array(cmdline.utf8) + [0])
    }

    @Test("guest memory too small for the Debian kernel says how much is needed",
          .enabled(if: Fixture.haveDebianKernel, "needs \(Fixture.debianKernel)"))
    func tooSmall() throws {
        let mem = try GuestRAM(size: .mebibytes(32))
        let e = #expect(throws: MicroVMError.self) {
            try LinuxLoader.load(kernelPath: Fixture.debianKernel, initrdPath: nil, cmdline: "", memory: mem, cpus: 1)
        }
        #expect(e?.code == .invalidArgument)
        #expect(e?.message.contains("too small") == true)
    }

    /// (what, offset, bytes written there, expected message fragment)
    static let corruptions: [(String, Int, [UInt8], String)] = [
        ("boot flag", 0x1fe, [0, 0], "boot_flag at 0x1FE"),
        ("HdrS", 0x202, Array("XdrS".utf8), "missing 'HdrS' magic at 0x202"),
        ("old protocol", 0x206, [0x0a, 0x02], "too old"),
        ("zImage", 0x211, [0], "LOADED_HIGH"),
        ("32-bit", 0x236, [0, 0], "XLF_KERNEL_64"),
        ("syssize", 0x1f4, Fixture.le32(8192 / 16 + 1), "truncated: header says 8208 bytes of protected-mode code, file has 8192"),
        ("setup_sects", 0x1f1, [40], "truncated: setup_sects says"),
        ("payload", 0x248, Fixture.le32(8000), "payload"),
        ("short header", 0x201, [0x40], "setup header ends at 0x242"),
        ("alignment", 0x230, Fixture.le32(0x30_0000), "power of two"),
        ("init_size", 0x260, Fixture.le32(16), "init_size"),
        ("pref_address", 0x258, Fixture.le64(UInt64.max), "pref_address 0xffffffffffffffff"),
    ]

    @Test("each corruption gives its own clear error", arguments: corruptions)
    func corrupt(name: String, offset: Int, bytes: [UInt8], message: String) throws {
        var f = Fixture.bzImage()
        f.replaceSubrange(offset..<(offset + bytes.count), with: bytes)
        let e = #expect(throws: MicroVMError.self, "\(name)") { try BzImage(ImageBuffer(f)) }
        #expect(e?.code == .invalidImage)
        #expect(e?.message.contains(message) == true, "\(name): \(e?.message ?? "no error")")
    }

    @Test("a truncated real kernel file is reported as truncated",
          .enabled(if: Fixture.haveDebianKernel, "needs \(Fixture.debianKernel)"))
    func truncatedFile() throws {
        let file = try ImageFile(path: Fixture.debianKernel)
        let half = try file.bytes(at: 0, count: Int(file.size / 2))
        let e = #expect(throws: MicroVMError.self) { try BzImage(ImageBuffer(half)) }
        #expect(e?.message.hasPrefix("truncated: header says") == true, "\(e?.message ?? "")")
    }

    @Test("tiny and non-kernel files are refused, and a missing path is not-found")
    func notKernels() throws {
        let mem = try GuestRAM(size: .mebibytes(64))
        for bytes in [[UInt8](), [0x7f], Array("#!/bin/sh\necho hi\n".utf8), [UInt8](repeating: 0, count: 4096)] {
            let e = #expect(throws: MicroVMError.self) {
                try LinuxLoader.load(kernel: ImageBuffer(bytes), initrd: nil, cmdline: "", memory: mem, cpus: 1)
            }
            #expect(e?.code == .invalidImage)
        }
        let e = #expect(throws: MicroVMError.self) {
            try LinuxLoader.load(kernelPath: "/nonexistent/vmlinuz", initrdPath: nil, cmdline: "", memory: mem, cpus: 1)
        }
        #expect(e?.code == .notFound)
    }

    @Test("command lines: the header's cmdline_size is the limit, NUL is refused")
    func commandLine() throws {
        let mem = try GuestRAM(size: .mebibytes(64))
        let k = ImageBuffer(Fixture.bzImage())
        _ = try LinuxLoader.load(kernel: k, initrd: nil, cmdline: String(repeating: "a", count: 2047), memory: mem, cpus: 1)
        #expect(try mem.u8(0x20000 + 2047) == 0)
        #expect(try mem.u32(0x7000 + 0x218) == 0, "no initrd, no ramdisk")
        let e = #expect(throws: MicroVMError.self) {
            try LinuxLoader.load(kernel: k, initrd: nil, cmdline: String(repeating: "a", count: 2048), memory: mem, cpus: 1)
        }
        #expect(e?.message.contains("at most 2047") == true)
        #expect(throws: MicroVMError.self) {
            try LinuxLoader.load(kernel: k, initrd: nil, cmdline: "a\u{0}b", memory: mem, cpus: 1)
        }
    }

    @Test("an initrd too large for the memory left is refused with what to do")
    func initrdTooLarge() throws {
        let mem = try GuestRAM(size: .mebibytes(32))
        let e = #expect(throws: MicroVMError.self) {
            try LinuxLoader.load(kernel: ImageBuffer(Fixture.bzImage()), initrd: ImageBuffer([UInt8](repeating: 1, count: 15 << 20)),
                                 cmdline: "", memory: mem, cpus: 1)
        }
        #expect(e?.message.contains("more memory") == true)
    }

    @Test("a non-relocatable kernel is loaded at pref_address")
    func nonRelocatable() throws {
        var f = Fixture.bzImage()
        f[0x234] = 0
        f.put(UInt64(0x20_0000), at: 0x258)
        let mem = try GuestRAM(size: .mebibytes(64))
        let entry = try LinuxLoader.load(kernel: ImageBuffer(f), initrd: nil, cmdline: "", memory: mem, cpus: 1)
        #expect(entry.entry == 0x20_0200)
        #expect(try mem.u32(0x7000 + 0x214) == 0x20_0000)
        #expect(try mem.readBytes(at: 0x20_0000, count: 16) == Array(f[2560..<2576]))
    }

    @Test("memory maps: small, exactly 3 GiB, and split around the MMIO hole")
    func memoryMaps() throws {
        let big = try GuestRAM(size: .gibibytes(5))
        let m = try MemoryMap.entries(for: big)
        #expect(m == [
            .init(base: 0, size: 0x9fc00, kind: .ram),
            .init(base: 0x9fc00, size: 0x60400, kind: .reserved),
            .init(base: 0x10_0000, size: 0xc000_0000 - 0x10_0000, kind: .ram),
            .init(base: 0x1_0000_0000, size: 2 << 30, kind: .ram),
        ])
        #expect(MemoryMap.lowRAMEnd(m) == 0xc000_0000)
        let three = try MemoryMap.entries(for: GuestRAM(size: .gibibytes(3)))
        #expect(three.count == 3 && three[2].end == 0xc000_0000)
        #expect(throws: MicroVMError.self) { try MemoryMap.entries(for: GuestRAM(size: .kibibytes(512))) }
        // The zero page holds all of it.
        let zp = try BzImage(ImageBuffer(Fixture.bzImage())).zeroPage(cmdline: Layout.cmdline, initrd: nil, memoryMap: m)
        #expect(zp[0x1e8] == 4)
        #expect(zp.le(0x2d0 + 60, as: UInt64.self) == 0x1_0000_0000)
        #expect(zp.le(0x2d0 + 60 + 16, as: UInt32.self) == 1)
    }
}
