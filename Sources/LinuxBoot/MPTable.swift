import MicroVMCore
import GuestMemory

/// An Intel MultiProcessor Specification 1.4 table, so Linux finds every vCPU, the IOAPIC and
/// the ISA interrupt routing without ACPI. Written into the EBDA where Linux scans for "_MP_".
///
/// Layout: the 16-byte floating pointer, then the "PCMP" configuration table: one processor
/// entry per vCPU (APIC ids 0..N-1, the first is the BSP), one ISA bus, the IOAPIC (id N),
/// I/O interrupt entries routing bus IRQ i to IOAPIC pin i, and LINT0 = ExtINT, LINT1 = NMI.
public enum MPTable {
    public static let floatingPointerSize = 16
    public static let headerSize = 44
    public static let processorEntrySize = 20
    public static let shortEntrySize = 8
    /// IOAPIC pins; Linux's ISA IRQs 0-15 plus the PCI-style pins up to 23.
    public static let ioapicPins = 24
    public static let localAPICVersion: UInt8 = 0x14
    public static let ioapicVersion: UInt8 = 0x11
    public static let busID: UInt8 = 0
    /// APIC ids are 8 bits, the IOAPIC takes the id after the last CPU and 0xff is broadcast.
    public static let maxCPUs = 254

    enum EntryType: UInt8 { case processor = 0, bus = 1, ioapic = 2, ioInterrupt = 3, localInterrupt = 4 }
    enum InterruptType: UInt8 { case int = 0, nmi = 1, smi = 2, extINT = 3 }

    /// Total bytes the table takes for `cpus` processors.
    public static func size(cpus: Int) -> Int {
        floatingPointerSize + headerSize + cpus * processorEntrySize + shortEntrySize * (2 + ioapicPins + 2)
    }

    /// Builds the table bytes as they go at `address`.
    public static func build(cpus: Int, at address: GuestAddress = Layout.mpTable) throws -> [UInt8] {
        guard cpus >= 1, cpus <= maxCPUs else {
            throw MicroVMError.invalidArgument("\(cpus) vCPUs cannot be described: the MP table supports 1 to \(maxCPUs)")
        }
        let ioapicID = UInt8(cpus)
        var t: [UInt8] = []
        t.reserveCapacity(size(cpus: cpus))
        func u16(_ v: UInt16) { t += [UInt8(v & 0xff), UInt8(v >> 8)] }
        func u32(_ v: UInt32) { for i in 0..<4 { t.append(UInt8(truncatingIfNeeded: v >> (8 * UInt32(i)))) } }

        // Floating pointer; its checksum is filled in below.
        t += Array("_MP_".utf8)
        u32(UInt32(truncatingIfNeeded: address.rawValue) + UInt32(floatingPointerSize))
        t += [1 /* length in 16-byte units */, 4 /* spec 1.4 */, 0 /* checksum */, 0 /* config table present */, 0, 0, 0, 0]

        let configStart = t.count
        t += Array("PCMP".utf8)
        u16(0) // base table length, patched
        t += [4, 0] // spec revision, checksum
        t += Array("MICROVM ".utf8)
        t += Array("MVM-DIRECT  ".utf8)
        u32(0); u16(0) // no OEM table
        u16(0) // entry count, patched
        u32(UInt32(Layout.localAPIC.rawValue))
        u16(0); t += [0, 0] // no extended table

        var entries: UInt16 = 0
        for id in 0..<cpus {
            let flags: UInt8 = id == 0 ? 0b11 : 0b01 // enabled, BSP
            t += [EntryType.processor.rawValue, UInt8(id), localAPICVersion, flags]
            u32(0x600) // CPU signature: family 6
            u32(0x201) // feature flags: FPU, APIC
            t += [UInt8](repeating: 0, count: 8)
            entries += 1
        }
        t += [EntryType.bus.rawValue, busID] + Array("ISA   ".utf8)
        entries += 1
        t += [EntryType.ioapic.rawValue, ioapicID, ioapicVersion, 1 /* enabled */]
        u32(UInt32(Layout.ioapic.rawValue))
        entries += 1
        for pin in 0..<ioapicPins {
            t += [EntryType.ioInterrupt.rawValue, InterruptType.int.rawValue]
            u16(0) // polarity and trigger conform to the bus
            t += [busID, UInt8(pin), ioapicID, UInt8(pin)]
            entries += 1
        }
        t += [EntryType.localInterrupt.rawValue, InterruptType.extINT.rawValue]
        u16(0)
        t += [busID, 0, 0xff, 0] // all local APICs, LINT0
        t += [EntryType.localInterrupt.rawValue, InterruptType.nmi.rawValue]
        u16(0)
        t += [busID, 0, 0xff, 1] // all local APICs, LINT1
        entries += 2

        let configLength = t.count - configStart
        t.put(UInt16(configLength), at: configStart + 4)
        t.put(entries, at: configStart + 34)
        t[configStart + 7] = checksum(t[configStart...])
        t[10] = checksum(t[0..<floatingPointerSize])
        return t
    }

    /// Writes the table for `cpus` vCPUs at `Layout.mpTable`.
    public static func write(cpus: Int, memory: any GuestMemory, at address: GuestAddress = Layout.mpTable) throws {
        let t = try build(cpus: cpus, at: address)
        guard address.rawValue + UInt64(t.count) <= Layout.highMemoryStart else {
            throw MicroVMError(.internalError, "MP table of \(t.count) bytes at \(address) runs past the reserved area below 1 MiB")
        }
        try memory.writeBytes(t, at: address)
    }

    /// The byte that makes `bytes` (with it in place of a zero) sum to 0 mod 256.
    static func checksum(_ bytes: ArraySlice<UInt8>) -> UInt8 {
        let sum = bytes.reduce(UInt8(0)) { $0 &+ $1 }
        return 0 &- sum
    }
}
