import MicroVMCore
import GuestMemory

/// One virtio-mmio transport as ACPI describes it: its register window and the GSI it signals.
public struct ACPIMMIODevice: Sendable, Equatable {
    public var base: UInt64
    public var length: UInt64
    public var gsi: UInt32
    public init(base: UInt64, length: UInt64, gsi: UInt32) { self.base = base; self.length = length; self.gsi = gsi }
}

/// The ACPI tables the direct VMM hands a Linux guest: RSDP → XSDT → FADT (→ DSDT) and MADT.
///
/// Linux kernels built without `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` (Debian's among them) only
/// find virtio-mmio transports through firmware, so the DSDT carries one `LNRO0005` device per
/// transport, as QEMU's microvm and Cloud Hypervisor do. The FADT declares a hardware-reduced
/// platform: there is no PM timer, SCI or sleep register block to emulate; COM1 and the i8042
/// are described in the DSDT so that their ISA interrupts are still mapped. Everything sits in
/// the BIOS area below 1 MiB (already reserved in e820), with the RSDP at 0xE0000 so Linux's
/// legacy scan finds it even without `acpi_rsdp_addr`.
///
/// ```swift
/// let rsdp = try ACPITables.write(into: memory, cpus: 2,
///                                 virtioMMIO: [ACPIMMIODevice(base: 0xd000_0000, length: 0x1000, gsi: 5)])
/// ```
public enum ACPITables {
    public static let oemID = Array("MICROV".utf8)
    public static let oemTableID = Array("MVMDIRCT".utf8)
    public static let creatorID = Array("MVM ".utf8)
    public static let headerSize = 36
    public static let rsdpSize = 36
    /// ACPI 6.3's FADT, hypervisor vendor identity included.
    public static let fadtSize = 276
    public static let fadtRevision: UInt8 = 6
    public static let fadtMinorRevision: UInt8 = 3

    /// FADT `Flags`: HW_REDUCED_ACPI — no fixed-hardware ACPI registers exist.
    public static let fadtFlagHardwareReduced: UInt32 = 1 << 20
    /// IAPC_BOOT_ARCH: an 8042 is present (the VMM's i8042 takes `reboot=k`), and no VGA is.
    /// The CMOS RTC at 0x70 is present, so "no CMOS RTC" stays clear.
    public static let bootArch8042: UInt16 = 1 << 1
    public static let bootArchNoVGA: UInt16 = 1 << 2

    /// Field offsets in the FADT.
    enum FADT {
        static let firmwareCtrl = 36, dsdt = 40, flags = 112, bootArch = 109
        static let minorRevision = 131, xDSDT = 140, hypervisorVendor = 268
    }

    /// Builds the tables as they go at `address` (the RSDP first) and returns their bytes and
    /// where each table starts. Every table starts on a 16-byte boundary.
    public static func build(cpus: Int, virtioMMIO: [ACPIMMIODevice], at address: GuestAddress = Layout.acpiRSDP) throws -> (bytes: [UInt8], xsdt: UInt64, fadt: UInt64, madt: UInt64, dsdt: UInt64) {
        let base = address.rawValue
        let dsdt = try dsdtTable(virtioMMIO: virtioMMIO)
        let madt = try madtTable(cpus: cpus)
        func align(_ v: Int) -> Int { (v + 15) & ~15 }
        let xsdtOff = align(rsdpSize)
        let xsdtSize = headerSize + 2 * 8
        let fadtOff = align(xsdtOff + xsdtSize)
        let madtOff = align(fadtOff + fadtSize)
        let dsdtOff = align(madtOff + madt.count)
        var out = [UInt8](repeating: 0, count: dsdtOff + dsdt.count)

        var fadt = header("FACP", length: fadtSize, revision: fadtRevision)
        fadt += [UInt8](repeating: 0, count: fadtSize - headerSize)
        fadt.put(UInt32(truncatingIfNeeded: base + UInt64(dsdtOff)), at: FADT.dsdt)
        fadt.put(bootArch8042 | bootArchNoVGA, at: FADT.bootArch)
        fadt.put(fadtFlagHardwareReduced, at: FADT.flags)
        fadt[FADT.minorRevision] = fadtMinorRevision
        fadt.put(base + UInt64(dsdtOff), at: FADT.xDSDT)
        fadt.replaceSubrange(FADT.hypervisorVendor..<(FADT.hypervisorVendor + 8), with: Array("MICROVMD".utf8))
        sealChecksum(&fadt)

        var xsdt = header("XSDT", length: xsdtSize, revision: 1)
        xsdt += [UInt8](repeating: 0, count: 16)
        xsdt.put(base + UInt64(fadtOff), at: headerSize)
        xsdt.put(base + UInt64(madtOff), at: headerSize + 8)
        sealChecksum(&xsdt)

        var rsdp = Array("RSD PTR ".utf8) + [0] + oemID + [2]
        rsdp += [0, 0, 0, 0] // no RSDT: revision 2 guests use the XSDT
        rsdp += [UInt8](repeating: 0, count: rsdpSize - rsdp.count)
        rsdp.put(UInt32(rsdpSize), at: 20)
        rsdp.put(base + UInt64(xsdtOff), at: 24)
        rsdp[8] = checksum(rsdp[0..<20])
        rsdp[32] = checksum(rsdp[0..<rsdpSize])

        out.replaceSubrange(0..<rsdpSize, with: rsdp)
        out.replaceSubrange(xsdtOff..<(xsdtOff + xsdtSize), with: xsdt)
        out.replaceSubrange(fadtOff..<(fadtOff + fadtSize), with: fadt)
        out.replaceSubrange(madtOff..<(madtOff + madt.count), with: madt)
        out.replaceSubrange(dsdtOff..<(dsdtOff + dsdt.count), with: dsdt)
        return (out, base + UInt64(xsdtOff), base + UInt64(fadtOff), base + UInt64(madtOff), base + UInt64(dsdtOff))
    }

    /// Writes the tables at `Layout.acpiRSDP` and returns the RSDP's address, which the loader
    /// passes in `boot_params.acpi_rsdp_addr` / `hvm_start_info.rsdp_paddr`.
    @discardableResult
    public static func write(into memory: any GuestMemory, cpus: Int, virtioMMIO: [ACPIMMIODevice]) throws -> GuestAddress {
        let address = Layout.acpiRSDP
        let t = try build(cpus: cpus, virtioMMIO: virtioMMIO, at: address).bytes
        guard address.rawValue + UInt64(t.count) <= Layout.acpiEnd else {
            throw MicroVMError.invalidArgument("the ACPI tables (\(t.count) bytes) do not fit below 1 MiB: use fewer vCPUs or virtio devices")
        }
        try memory.writeBytes(t, at: address)
        return address
    }

    // MARK: MADT

    enum MADTEntry: UInt8 { case localAPIC = 0, ioapic = 1, interruptOverride = 2, localAPICNMI = 4 }
    public static let madtPCATCompat: UInt32 = 1

    static func madtTable(cpus: Int) throws -> [UInt8] {
        guard cpus >= 1, cpus <= MPTable.maxCPUs else {
            throw MicroVMError.invalidArgument("\(cpus) vCPUs cannot be described: the MADT here supports 1 to \(MPTable.maxCPUs)")
        }
        var body: [UInt8] = []
        func u16(_ v: UInt16) { body += [UInt8(v & 0xff), UInt8(v >> 8)] }
        func u32(_ v: UInt32) { for i in 0..<4 { body.append(UInt8(truncatingIfNeeded: v >> (8 * UInt32(i)))) } }
        u32(UInt32(Layout.localAPIC.rawValue))
        u32(madtPCATCompat)
        for id in 0..<cpus {
            body += [MADTEntry.localAPIC.rawValue, 8, UInt8(id), UInt8(id)]
            u32(1) // enabled
        }
        body += [MADTEntry.ioapic.rawValue, 12, UInt8(cpus), 0]
        u32(UInt32(Layout.ioapic.rawValue))
        u32(0) // GSI base
        // KVM's in-kernel PIT drives IOAPIC pin 2, as on a PC; the other ISA IRQs map 1:1.
        body += [MADTEntry.interruptOverride.rawValue, 10, 0 /* ISA */, 0 /* IRQ0 */]
        u32(2)
        u16(0) // conforms to the bus: edge, active high
        body += [MADTEntry.localAPICNMI.rawValue, 6, 0xff /* all processors */]
        u16(0)
        body.append(1) // LINT1
        var t = header("APIC", length: headerSize + body.count, revision: 5) + body
        sealChecksum(&t)
        return t
    }

    // MARK: DSDT

    /// The DSDT: `Scope (\_SB) { Device (VRnn) { _HID "LNRO0005", _UID n, _CCA 1, _CRS } …,
    /// COM1, PS2K }` (the legacy devices unless `legacy` is false).
    static func dsdtTable(virtioMMIO: [ACPIMMIODevice], legacy: Bool = true) throws -> [UInt8] {
        var devices: [UInt8] = []
        for (i, d) in virtioMMIO.enumerated() {
            devices += try AML.virtioMMIODevice(index: i, d)
        }
        if legacy { devices += try AML.legacyDevices() }
        // At the root of the definition block a relative name is the absolute one; iasl emits it so.
        let aml = try AML.scope("_SB_", devices)
        var t = header("DSDT", length: headerSize + aml.count, revision: 2) + aml
        sealChecksum(&t)
        return t
    }

    // MARK: Helpers

    /// A standard 36-byte table header with the checksum left zero.
    static func header(_ signature: String, length: Int, revision: UInt8) -> [UInt8] {
        var h = Array(signature.utf8)
        h += [0, 0, 0, 0, revision, 0]
        h.put(UInt32(length), at: 4)
        h += oemID + oemTableID
        h += [1, 0, 0, 0] // OEM revision
        h += creatorID
        h += [1, 0, 0, 0] // creator revision
        return h
    }

    static func sealChecksum(_ t: inout [UInt8]) {
        t[9] = 0
        t[9] = checksum(t[...])
    }

    static func checksum(_ bytes: ArraySlice<UInt8>) -> UInt8 {
        0 &- bytes.reduce(UInt8(0)) { $0 &+ $1 }
    }
}
