import MicroVMCore
import GuestMemory

/// A validated ELF64 x86-64 vmlinux: its loadable segments and the PVH entry from its notes.
public struct ElfKernel: Sendable {
    public struct Segment: Sendable, Equatable {
        public var fileOffset: UInt64
        public var fileSize: UInt64
        public var physicalAddress: UInt64
        public var memorySize: UInt64
    }

    public let entry: UInt64
    public let segments: [Segment]
    /// The 32-bit PVH entry (Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY), if the kernel has one.
    public let pvhEntry: UInt32?

    static let magic: [UInt8] = [0x7f, 0x45, 0x4c, 0x46]
    static let headerSize = 64
    static let programHeaderSize = 56
    static let ptLoad: UInt32 = 1
    static let ptNote: UInt32 = 4
    static let machineX86_64: UInt16 = 62
    /// The corresponding C constant is `XEN_ELFNOTE_PHYS32_ENTRY`.
    public static let xenElfNotePhys32Entry: UInt32 = 18
    /// A note section larger than this is not a kernel's; refuse rather than allocate.
    static let maxNoteSize: UInt64 = 1 << 20

    /// Whether the image starts with the ELF magic.
    public static func isELF(_ image: any ImageSource) -> Bool {
        guard image.size >= 4, let b = try? image.bytes(at: 0, count: 4) else { return false }
        return b == magic
    }

    public init(_ image: any ImageSource) throws {
        guard image.size >= UInt64(Self.headerSize) else {
            throw MicroVMError(.invalidImage, "truncated ELF: \(image.size) bytes, the ELF header alone needs 64")
        }
        let h = try image.bytes(at: 0, count: Self.headerSize)
        guard Array(h[0..<4]) == Self.magic else {
            throw MicroVMError(.invalidImage, "not an ELF file: missing \\x7fELF magic")
        }
        guard h[4] == 2 else { throw MicroVMError(.invalidImage, "ELF class \(h[4]) is not ELFCLASS64: a 64-bit vmlinux is required") }
        guard h[5] == 1 else { throw MicroVMError(.invalidImage, "ELF data encoding \(h[5]) is not little-endian") }
        let type: UInt16 = h.le(0x10)
        guard type == 2 else { throw MicroVMError(.invalidImage, "ELF type \(type) is not ET_EXEC: a vmlinux is an executable") }
        let machine: UInt16 = h.le(0x12)
        guard machine == Self.machineX86_64 else {
            throw MicroVMError(.invalidImage, "ELF machine \(machine) is not x86-64 (62)")
        }
        let entry: UInt64 = h.le(0x18)
        let phoff: UInt64 = h.le(0x20)
        let phentsize: UInt16 = h.le(0x36)
        let phnum: UInt16 = h.le(0x38)
        guard phentsize == UInt16(Self.programHeaderSize) else {
            throw MicroVMError(.invalidImage, "ELF program header size \(phentsize) is not 56")
        }
        guard phnum > 0, image.contains(offset: phoff, count: UInt64(phnum) * UInt64(phentsize)) else {
            throw MicroVMError(.invalidImage, "ELF program headers (\(phnum) at offset \(phoff)) lie outside the \(image.size)-byte file")
        }
        let table = try image.bytes(at: phoff, count: Int(phnum) * Self.programHeaderSize)
        var segments: [Segment] = []
        var pvh: UInt32?
        for i in 0..<Int(phnum) {
            let at = i * Self.programHeaderSize
            let pType: UInt32 = table.le(at)
            let offset: UInt64 = table.le(at + 8)
            let paddr: UInt64 = table.le(at + 0x18)
            let filesz: UInt64 = table.le(at + 0x20)
            let memsz: UInt64 = table.le(at + 0x28)
            switch pType {
            case Self.ptLoad:
                guard image.contains(offset: offset, count: filesz) else {
                    throw MicroVMError(.invalidImage, "truncated ELF: segment \(i) wants bytes [\(offset), +\(filesz)) of a \(image.size)-byte file")
                }
                guard filesz <= memsz, paddr.addingReportingOverflow(memsz).overflow == false else {
                    throw MicroVMError(.invalidImage, "ELF segment \(i) is malformed: file size \(filesz), memory size \(memsz) at \(hex(paddr))")
                }
                segments.append(Segment(fileOffset: offset, fileSize: filesz, physicalAddress: paddr, memorySize: memsz))
            case Self.ptNote where pvh == nil:
                guard image.contains(offset: offset, count: filesz), filesz <= Self.maxNoteSize else {
                    throw MicroVMError(.invalidImage, "ELF note segment \(i) ([\(offset), +\(filesz))) lies outside the file")
                }
                pvh = try Self.findPVHEntry(notes: image.bytes(at: offset, count: Int(filesz)))
            default:
                break
            }
        }
        guard !segments.isEmpty else { throw MicroVMError(.invalidImage, "ELF has no PT_LOAD segments: nothing to load") }
        self.entry = entry
        self.segments = segments
        self.pvhEntry = pvh
    }

    /// Walks ELF notes (namesz, descsz, type, name padded to 4, desc padded to 4).
    static func findPVHEntry(notes: [UInt8]) throws -> UInt32? {
        var at = 0
        while at + 12 <= notes.count {
            let namesz = Int(notes.le(at, as: UInt32.self))
            let descsz = Int(notes.le(at + 4, as: UInt32.self))
            let type: UInt32 = notes.le(at + 8)
            let nameAt = at + 12
            let descAt = nameAt + (namesz + 3) & ~3
            let next = descAt + (descsz + 3) & ~3
            // Sizes are at most 2^32 each, so these sums cannot overflow Int; bound them by the buffer.
            guard namesz <= notes.count, descsz <= notes.count, next <= notes.count else {
                throw MicroVMError(.invalidImage, "ELF note at offset \(at) runs past its segment (name \(namesz), desc \(descsz) bytes)")
            }
            if type == xenElfNotePhys32Entry, namesz == 4, Array(notes[nameAt..<(nameAt + 4)]) == Array("Xen\0".utf8) {
                switch descsz {
                case 4: return notes.le(descAt, as: UInt32.self)
                case 8:
                    let v: UInt64 = notes.le(descAt)
                    guard v <= UInt64(UInt32.max) else {
                        throw MicroVMError(.invalidImage, "PVH entry \(hex(v)) in the Xen ELF note is above 4 GiB")
                    }
                    return UInt32(v)
                default:
                    throw MicroVMError(.invalidImage, "Xen PHYS32_ENTRY note has a \(descsz)-byte value, expected 4 or 8")
                }
            }
            at = next
        }
        return nil
    }

    /// Highest physical address + 1 of any segment.
    public var end: UInt64 { segments.map { $0.physicalAddress + $0.memorySize }.max() ?? 0 }

    /// Copies every PT_LOAD segment to its physical address and zeroes its BSS tail.
    func load(from image: any ImageSource, into memory: any GuestMemory) throws {
        for (i, s) in segments.enumerated() {
            guard s.physicalAddress >= Layout.highMemoryStart else {
                throw MicroVMError(.invalidImage, "ELF segment \(i) at \(hex(s.physicalAddress)) would overwrite the boot structures below 1 MiB")
            }
            guard s.memorySize <= UInt64(Int.max), memory.contains(GuestAddress(s.physicalAddress), count: Int(s.memorySize)) else {
                throw MicroVMError.invalidArgument("ELF segment \(i) [\(hex(s.physicalAddress)), +\(s.memorySize)) does not fit in guest memory of \(ByteCount(memory.end.rawValue)): give the VM more memory")
            }
            try image.copy(offset: s.fileOffset, count: s.fileSize, to: memory, at: GuestAddress(s.physicalAddress))
            let bss = s.memorySize - s.fileSize
            if bss > 0 {
                let p = try memory.hostPointer(at: GuestAddress(s.physicalAddress + s.fileSize), count: Int(bss))
                p.initializeMemory(as: UInt8.self, repeating: 0, count: Int(bss))
            }
        }
    }
}

/// The PVH boot ABI's `struct hvm_start_info` and friends (xen/include/public/arch-x86/hvm/start_info.h).
public enum PVHStartInfo {
    public static let magic: UInt32 = 0x336e_c578
    public static let version: UInt32 = 1
    public static let size = 56
    public static let modlistEntrySize = 32
    public static let memmapEntrySize = 24
    // Field offsets in hvm_start_info.
    public static let magicOffset = 0
    public static let versionOffset = 4
    public static let flagsOffset = 8
    public static let nrModulesOffset = 12
    public static let modlistPaddrOffset = 16
    public static let cmdlinePaddrOffset = 24
    public static let rsdpPaddrOffset = 32
    public static let memmapPaddrOffset = 40
    public static let memmapEntriesOffset = 48

    /// Writes start_info, the module list (the initrd, if any) and the memory map.
    static func write(cmdline: GuestAddress, initrd: (address: UInt64, size: UInt64)?, memoryMap: [MemoryMapEntry], rsdp: GuestAddress? = nil, to memory: any GuestMemory) throws {
        guard memoryMap.count <= Layout.pvhMemmapCapacity else {
            throw MicroVMError(.internalError, "memory map has \(memoryMap.count) entries, room for \(Layout.pvhMemmapCapacity)")
        }
        var info = [UInt8](repeating: 0, count: size)
        info.put(magic, at: magicOffset)
        info.put(version, at: versionOffset)
        info.put(UInt32(initrd == nil ? 0 : 1), at: nrModulesOffset)
        info.put(initrd == nil ? UInt64(0) : Layout.pvhModlist.rawValue, at: modlistPaddrOffset)
        info.put(cmdline.rawValue, at: cmdlinePaddrOffset)
        info.put(rsdp?.rawValue ?? 0, at: rsdpPaddrOffset)
        info.put(Layout.pvhMemmap.rawValue, at: memmapPaddrOffset)
        info.put(UInt32(memoryMap.count), at: memmapEntriesOffset)
        try memory.writeBytes(info, at: Layout.pvhStartInfo)

        if let initrd {
            var mod = [UInt8](repeating: 0, count: modlistEntrySize)
            mod.put(initrd.address, at: 0)
            mod.put(initrd.size, at: 8)
            try memory.writeBytes(mod, at: Layout.pvhModlist)
        }
        var map = [UInt8](repeating: 0, count: memoryMap.count * memmapEntrySize)
        for (i, e) in memoryMap.enumerated() {
            map.put(e.base, at: i * memmapEntrySize)
            map.put(e.size, at: i * memmapEntrySize + 8)
            map.put(e.kind.rawValue, at: i * memmapEntrySize + 16)
        }
        try memory.writeBytes(map, at: Layout.pvhMemmap)
    }
}
