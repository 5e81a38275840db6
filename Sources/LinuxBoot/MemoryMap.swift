import MicroVMCore
import GuestMemory

/// One range of the guest's physical memory map, as the kernel sees it in e820 (bzImage) or the
/// PVH memmap (ELF): type 1 is usable RAM, type 2 reserved.
public struct MemoryMapEntry: Equatable, Sendable, CustomStringConvertible {
    public enum Kind: UInt32, Sendable { case ram = 1, reserved = 2 }
    public var base: UInt64
    public var size: UInt64
    public var kind: Kind
    public init(base: UInt64, size: UInt64, kind: Kind) { self.base = base; self.size = size; self.kind = kind }
    public var end: UInt64 { base + size }
    public var description: String { "[\(hex(base)), \(hex(end))) \(kind)" }
}

public enum MemoryMap {
    /// The map for `memory`: RAM [0, EBDA), reserved [EBDA, 1 MiB) for the MP table, VGA and BIOS
    /// holes, then every RAM region above 1 MiB (up to the 3 GiB MMIO hole and from 4 GiB on).
    /// Regions come from `GuestRAM.regions` when available, else from `end` and the hole.
    public static func entries(for memory: any GuestMemory) throws -> [MemoryMapEntry] {
        let ranges: [(UInt64, UInt64)]
        if let ram = memory as? GuestRAM {
            ranges = ram.regions.map { ($0.guestBase.rawValue, $0.guestEnd) }
        } else {
            let end = memory.end.rawValue
            ranges = end <= Layout.mmioHoleStart ? [(UInt64(0), end)] : [(UInt64(0), Layout.mmioHoleStart), (Layout.mmioHoleEnd, end)]
        }
        guard ranges.contains(where: { $0.0 == 0 && $0.1 > Layout.highMemoryStart }) else {
            throw MicroVMError.invalidArgument("guest memory of \(ByteCount(memory.end.rawValue)) is too small to boot Linux: give the VM at least 32M")
        }
        var out: [MemoryMapEntry] = []
        for (base, end) in ranges where end > base {
            let lowEnd = min(end, Layout.ebdaStart)
            if base < lowEnd { out.append(.init(base: base, size: lowEnd - base, kind: .ram)) }
            let highBase = max(base, Layout.highMemoryStart)
            if highBase < end { out.append(.init(base: highBase, size: end - highBase, kind: .ram)) }
        }
        out.append(.init(base: Layout.ebdaStart, size: Layout.highMemoryStart - Layout.ebdaStart, kind: .reserved))
        out.sort { $0.base < $1.base }
        return out
    }

    /// End of the RAM that starts at 1 MiB and stays below the MMIO hole: where the initrd goes.
    static func lowRAMEnd(_ entries: [MemoryMapEntry]) -> UInt64 {
        entries.first { $0.kind == .ram && $0.base == Layout.highMemoryStart }.map { min($0.end, Layout.mmioHoleStart) } ?? Layout.highMemoryStart
    }
}
