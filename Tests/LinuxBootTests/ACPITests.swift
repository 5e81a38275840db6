import Foundation
import Testing
import GuestMemory
import MicroVMCore
@testable import LinuxBoot

@Suite("ACPI tables")
struct ACPITests {
    static let virtio = [ACPIMMIODevice(base: 0xd000_0000, length: 0x1000, gsi: 5),
                         ACPIMMIODevice(base: 0xd000_1000, length: 0x1000, gsi: 6)]
    static var haveIASL: Bool { FileManager.default.isExecutableFile(atPath: "/usr/bin/iasl") }

    /// `iasl` output for the one-device ASL in `iaslAgreesOnTheDSDT`, after the table header.
    static let expectedDevice0: [UInt8] = hexBytes("""
        1049045f53425f5b82410456523030085f4849440d4c4e524f3030303500085f
        55494400085f43434101085f435253111a0a1786090001000000d00010000089
        06000301050000007900
        """)

    static func hexBytes(_ s: String) -> [UInt8] {
        let digits = Array(s.filter { $0.isHexDigit })
        return stride(from: 0, to: digits.count, by: 2).map { UInt8(String(digits[$0...$0 + 1]), radix: 16)! }
    }

    func table(_ mem: GuestRAM, at address: UInt64) throws -> [UInt8] {
        let head = try mem.readBytes(at: GuestAddress(address), count: 8)
        let length = Int(head.le(4, as: UInt32.self))
        return try mem.readBytes(at: GuestAddress(address), count: length)
    }

    func sum(_ b: [UInt8]) -> UInt8 { b.reduce(0) { $0 &+ $1 } }

    @Test("RSDP: signature, revision 2, both checksums, XSDT pointer")
    func rsdp() throws {
        let mem = try GuestRAM(size: .mebibytes(4))
        let at = try ACPITables.write(into: mem, cpus: 2, virtioMMIO: Self.virtio)
        #expect(at == Layout.acpiRSDP)
        let r = try mem.readBytes(at: at, count: 36)
        #expect(Array(r[0..<8]) == Array("RSD PTR ".utf8))
        #expect(r[15] == 2)
        #expect(sum(Array(r[0..<20])) == 0)
        #expect(sum(r) == 0)
        #expect(r.le(20, as: UInt32.self) == 36)
        let xsdt = r.le(24, as: UInt64.self)
        #expect(xsdt > at.rawValue && xsdt < Layout.acpiEnd)
        #expect(Array(try table(mem, at: xsdt)[0..<4]) == Array("XSDT".utf8))
        // Linux's legacy scan only looks at 16-byte boundaries in the BIOS area.
        #expect(at.rawValue % 16 == 0 && at.rawValue >= 0xe0000 && at.rawValue < 0x10_0000)
    }

    @Test("every table's checksum makes it sum to zero; XSDT points at FADT and MADT", arguments: [1, 2, 8, 254])
    func checksumsAndPointers(cpus: Int) throws {
        let mem = try GuestRAM(size: .mebibytes(4))
        let rsdp = try ACPITables.write(into: mem, cpus: cpus, virtioMMIO: Self.virtio)
        let xsdtAddr = try mem.readBytes(at: rsdp, count: 36).le(24, as: UInt64.self)
        let xsdt = try table(mem, at: xsdtAddr)
        #expect(xsdt.count == 36 + 16)
        let fadt = try table(mem, at: xsdt.le(36, as: UInt64.self))
        let madt = try table(mem, at: xsdt.le(44, as: UInt64.self))
        #expect(Array(fadt[0..<4]) == Array("FACP".utf8))
        #expect(Array(madt[0..<4]) == Array("APIC".utf8))
        let dsdt = try table(mem, at: fadt.le(140, as: UInt64.self))
        #expect(Array(dsdt[0..<4]) == Array("DSDT".utf8))
        for t in [xsdt, fadt, madt, dsdt] {
            #expect(sum(t) == 0, "table \(String(decoding: t[0..<4], as: UTF8.self))")
        }
    }

    @Test("FADT: revision 6, hardware reduced, 8042 present, no VGA, CMOS RTC kept, DSDT in both fields")
    func fadt() throws {
        let (bytes, _, fadtAddr, _, dsdtAddr) = try ACPITables.build(cpus: 1, virtioMMIO: [])
        let f = Array(bytes[Int(fadtAddr - Layout.acpiRSDP.rawValue)...].prefix(276))
        #expect(f.le(4, as: UInt32.self) == 276)
        #expect(f[8] == 6)
        #expect(f.le(112, as: UInt32.self) & (1 << 20) != 0)
        let arch = f.le(109, as: UInt16.self)
        #expect(arch & 0b10 != 0)       // 8042
        #expect(arch & 0b100 != 0)      // no VGA
        #expect(arch & 0b1000 == 0)     // MSI, left alone
        #expect(arch & 0b10_0000 == 0)  // CMOS RTC present
        #expect(f.le(140, as: UInt64.self) == dsdtAddr)
        #expect(UInt64(f.le(40, as: UInt32.self)) == dsdtAddr)
        #expect(f.le(76, as: UInt32.self) == 0) // no PM timer
    }

    @Test("MADT: one enabled local APIC per vCPU, the IOAPIC after them, IRQ0→GSI2, NMI on LINT1", arguments: [1, 3, 16])
    func madt(cpus: Int) throws {
        let (bytes, _, _, madtAddr, _) = try ACPITables.build(cpus: cpus, virtioMMIO: [])
        let start = Int(madtAddr - Layout.acpiRSDP.rawValue)
        let len = Int(bytes.le(start + 4, as: UInt32.self))
        let m = Array(bytes[start..<(start + len)])
        #expect(m.le(36, as: UInt32.self) == 0xfee0_0000)
        #expect(m.le(40, as: UInt32.self) == 1)
        var at = 44
        var lapics: [UInt8] = []
        var ioapics: [(id: UInt8, address: UInt32, base: UInt32)] = []
        var overrides: [(irq: UInt8, gsi: UInt32)] = []
        var nmis: [UInt8] = []
        while at < m.count {
            let type = m[at], l = Int(m[at + 1])
            try #require(l >= 2 && at + l <= m.count)
            switch type {
            case 0:
                #expect(m[at + 2] == m[at + 3])
                #expect(m.le(at + 4, as: UInt32.self) == 1)
                lapics.append(m[at + 3])
            case 1: ioapics.append((m[at + 2], m.le(at + 4, as: UInt32.self), m.le(at + 8, as: UInt32.self)))
            case 2: overrides.append((m[at + 3], m.le(at + 4, as: UInt32.self)))
            case 4: nmis.append(m[at + 5])
            default: Issue.record("unexpected MADT entry type \(type)")
            }
            at += l
        }
        #expect(at == m.count)
        #expect(lapics == (0..<cpus).map { UInt8($0) })
        #expect(ioapics.count == 1)
        #expect(ioapics.first?.id == UInt8(cpus) && ioapics.first?.address == 0xfec0_0000 && ioapics.first?.base == 0)
        #expect(overrides.count == 1 && overrides.first?.irq == 0 && overrides.first?.gsi == 2)
        #expect(nmis == [1])
    }

    @Test("vCPU counts the tables cannot describe are refused", arguments: [0, 255, -1])
    func badCPUCount(cpus: Int) {
        #expect(throws: MicroVMError.self) { try ACPITables.build(cpus: cpus, virtioMMIO: []) }
    }

    @Test("AML for one virtio-mmio device matches iasl's bytes")
    func amlDevice() throws {
        let dsdt = try ACPITables.dsdtTable(virtioMMIO: [Self.virtio[0]], legacy: false)
        #expect(Array(dsdt[36...]) == Self.expectedDevice0)
    }

    /// `iasl` output for `Device (COM1) { EisaId ("PNP0501"), _UID One, IO 0x3F8/8 + IRQNoFlags {4} }`
    /// and `Device (PS2K) { EisaId ("PNP0303"), IO 0x60, IO 0x64, IRQNoFlags {1} }`.
    static let expectedLegacy: [UInt8] = hexBytes("""
        5b822b434f4d31085f4849440c41d00501085f55494401085f435253
        11100a0d4701f803f8030808221000790
        05b822d5053324b085f4849440c41d00303085f4352531118
        0a15470160006000010147016400640001012202007900
        """)

    @Test("AML for COM1 and the i8042 matches iasl's bytes; EISA ids encode as iasl does")
    func amlLegacy() throws {
        #expect(try AML.legacyDevices() == Self.expectedLegacy)
        #expect(try AML.eisaID("PNP0501") == [0x0c, 0x41, 0xd0, 0x05, 0x01])
        #expect(throws: MicroVMError.self) { try AML.eisaID("pnp0501") }
        #expect(throws: MicroVMError.self) { try AML.eisaID("PNP05") }
        let dsdt = try ACPITables.dsdtTable(virtioMMIO: [Self.virtio[0]])
        #expect(Array(dsdt[36...]).count == Self.expectedDevice0.count + Self.expectedLegacy.count)
    }

    @Test("PkgLength encodings at the 1/2/3-byte boundaries")
    func pkgLength() throws {
        #expect(try AML.pkgLength(contentLength: 0) == [0x01])
        #expect(try AML.pkgLength(contentLength: 62) == [0x3f])
        #expect(try AML.pkgLength(contentLength: 63) == [0x41, 0x04])        // 65 = 0x41
        #expect(try AML.pkgLength(contentLength: 0x1000) == [0x83, 0x00, 0x01]) // 0x1003
        #expect(try AML.pkgLength(contentLength: 0xffd) == [0x4f, 0xff])     // 0xfff
        #expect(try AML.pkgLength(contentLength: 0xffe) == [0x81, 0x00, 0x01]) // 0x1001
    }

    @Test("integers take iasl's shortest form")
    func integers() {
        #expect(AML.integer(0) == [0])
        #expect(AML.integer(1) == [1])
        #expect(AML.integer(2) == [0x0a, 2])
        #expect(AML.integer(0x100) == [0x0b, 0, 1])
        #expect(AML.integer(0x1_0000) == [0x0c, 0, 0, 1, 0])
        #expect(AML.integer(0x1_0000_0000) == [0x0e, 0, 0, 0, 0, 1, 0, 0, 0])
    }

    @Test("devices outside Memory32Fixed's reach are refused")
    func badWindow() {
        #expect(throws: MicroVMError.self) {
            try AML.virtioMMIODevice(index: 0, ACPIMMIODevice(base: 0x1_0000_0000, length: 0x1000, gsi: 5))
        }
        #expect(throws: MicroVMError.self) {
            try AML.virtioMMIODevice(index: 0, ACPIMMIODevice(base: 0xffff_f000, length: 0x2000, gsi: 5))
        }
    }

    @Test("iasl disassembles our DSDT and finds every LNRO0005 device with its window and GSI",
          .enabled(if: ACPITests.haveIASL, "iasl is not installed (Debian package acpica-tools)"))
    func iaslDisassembles() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mvm-acpi-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let aml = dir.appendingPathComponent("dsdt.aml")
        try Data(try ACPITables.dsdtTable(virtioMMIO: Self.virtio)).write(to: aml)
        let r = try ProcessRunner.run(["/usr/bin/iasl", "-d", aml.path], currentDirectory: dir.path, timeout: 60)
        #expect(r.status == 0, "\(r.stdoutText)\(r.stderrText)")
        let dsl = try String(contentsOf: dir.appendingPathComponent("dsdt.dsl"), encoding: .utf8)
        #expect(dsl.components(separatedBy: "\"LNRO0005\"").count - 1 == 2)
        #expect(dsl.contains("Device (VR00)") && dsl.contains("Device (VR01)"))
        #expect(dsl.contains("0xD0001000"))
        #expect(dsl.contains("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )"))
        #expect(dsl.contains("0x00000006,"))
        #expect(dsl.contains("Device (COM1)") && dsl.contains("EisaId (\"PNP0501\")") && dsl.contains("{4}"))
        #expect(dsl.contains("Device (PS2K)") && dsl.contains("EisaId (\"PNP0303\")"))
    }

    @Test("the loader writes the tables and passes the RSDP in boot_params and hvm_start_info")
    func loaderPassesRSDP() throws {
        let mem = try GuestRAM(size: .mebibytes(64))
        _ = try LinuxLoader.load(kernel: ImageBuffer(Fixture.bzImage()), initrd: nil, cmdline: "", memory: mem, cpus: 2, virtioMMIO: Self.virtio)
        let zp = try mem.readBytes(at: Layout.zeroPage, count: 4096)
        #expect(zp.le(0x70, as: UInt64.self) == Layout.acpiRSDP.rawValue)
        #expect(try mem.readBytes(at: Layout.acpiRSDP, count: 8) == Array("RSD PTR ".utf8))
        let e820 = (0..<Int(zp[0x1e8])).map { i in
            (base: zp.le(0x2d0 + 20 * i, as: UInt64.self), size: zp.le(0x2d0 + 20 * i + 8, as: UInt64.self), type: zp.le(0x2d0 + 20 * i + 16, as: UInt32.self))
        }
        #expect(e820.contains { $0.type == 2 && $0.base <= Layout.acpiRSDP.rawValue && $0.base + $0.size >= Layout.acpiEnd })
        #expect(!e820.contains { $0.type == 1 && $0.base < Layout.acpiEnd && $0.base + $0.size > Layout.acpiRSDP.rawValue })

        let mem2 = try GuestRAM(size: .mebibytes(64))
        _ = try LinuxLoader.load(kernel: ImageBuffer(Fixture.elf(pvhEntry: 0x100_0000)), initrd: nil, cmdline: "", memory: mem2, cpus: 1,
                                 virtioMMIO: Self.virtio)
        let info = try mem2.readBytes(at: Layout.pvhStartInfo, count: PVHStartInfo.size)
        #expect(info.le(PVHStartInfo.rsdpPaddrOffset, as: UInt64.self) == Layout.acpiRSDP.rawValue)

        // Without virtio-mmio devices no tables are written: the legacy IRQs stay with the MP table.
        let mem3 = try GuestRAM(size: .mebibytes(64))
        _ = try LinuxLoader.load(kernel: ImageBuffer(Fixture.bzImage()), initrd: nil, cmdline: "", memory: mem3, cpus: 2)
        #expect(try mem3.readBytes(at: Layout.zeroPage, count: 4096).le(0x70, as: UInt64.self) == 0)
        #expect(try mem3.readBytes(at: Layout.acpiRSDP, count: 8) != Array("RSD PTR ".utf8))
    }
}
