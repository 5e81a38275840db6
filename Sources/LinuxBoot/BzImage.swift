import MicroVMCore
import GuestMemory

/// Offsets and flags of the x86 boot protocol (Documentation/arch/x86/boot.rst). The setup
/// header sits at the same offsets in the bzImage file and in `struct boot_params`.
public enum BootParams {
    // struct setup_header
    public static let setupSects = 0x1f1
    public static let rootFlags = 0x1f2
    public static let syssize = 0x1f4
    public static let vidMode = 0x1fa
    public static let bootFlag = 0x1fe
    public static let jump = 0x200
    public static let header = 0x202
    public static let version = 0x206
    public static let kernelVersion = 0x20e
    public static let typeOfLoader = 0x210
    public static let loadflags = 0x211
    public static let code32Start = 0x214
    public static let ramdiskImage = 0x218
    public static let ramdiskSize = 0x21c
    public static let heapEndPtr = 0x224
    public static let extLoaderVer = 0x226
    public static let cmdLinePtr = 0x228
    public static let initrdAddrMax = 0x22c
    public static let kernelAlignment = 0x230
    public static let relocatableKernel = 0x234
    public static let minAlignment = 0x235
    public static let xloadflags = 0x236
    public static let cmdlineSize = 0x238
    public static let payloadOffset = 0x248
    public static let payloadLength = 0x24c
    public static let setupData = 0x250
    public static let prefAddress = 0x258
    public static let initSize = 0x260
    public static let handoverOffset = 0x264
    // struct boot_params, outside the setup header
    /// `acpi_rsdp_addr` (u64), read by kernels speaking boot protocol 2.14 and later.
    public static let acpiRSDPAddr = 0x070
    public static let extRamdiskImage = 0x0c0
    public static let extRamdiskSize = 0x0c4
    public static let extCmdLinePtr = 0x0c8
    public static let e820Entries = 0x1e8
    public static let sentinel = 0x1ef
    public static let e820Table = 0x2d0
    public static let e820EntrySize = 20
    public static let e820MaxEntries = 128
    /// `struct boot_params` is one page.
    public static let size = 4096
    /// The setup header may not extend past here in `boot_params` (the EDD buffer follows).
    public static let headerLimit = 0x290

    public static let bootFlagValue: UInt16 = 0xaa55
    public static let headerMagic: UInt32 = 0x5372_6448 // "HdrS"
    /// Protocol 2.12 added xloadflags, which announces the 64-bit entry point.
    public static let minimumVersion: UInt16 = 0x020c
    /// "Undefined" boot loader id: we are not one of the registered loaders.
    public static let loaderTypeUndefined: UInt8 = 0xff
    /// Offset of `heap_end_ptr` below which setup may use a heap (relative to the setup code).
    public static let heapEnd: UInt16 = 0xfe00

    public struct LoadFlags: OptionSet, Sendable {
        public let rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        /// The protected-mode code is loaded at 0x100000. The corresponding C constant is `LOADED_HIGH`.
        public static let loadedHigh = LoadFlags(rawValue: 1 << 0)
        /// The corresponding C constant is `KASLR_FLAG`.
        public static let kaslr = LoadFlags(rawValue: 1 << 1)
        /// The corresponding C constant is `QUIET_FLAG`.
        public static let quiet = LoadFlags(rawValue: 1 << 5)
        /// The corresponding C constant is `KEEP_SEGMENTS`.
        public static let keepSegments = LoadFlags(rawValue: 1 << 6)
        /// `heap_end_ptr` is valid. The corresponding C constant is `CAN_USE_HEAP`.
        public static let canUseHeap = LoadFlags(rawValue: 1 << 7)
    }

    public struct XLoadFlags: OptionSet, Sendable {
        public let rawValue: UInt16
        public init(rawValue: UInt16) { self.rawValue = rawValue }
        /// The kernel has the legacy 64-bit entry point at 0x200. The corresponding C constant is `XLF_KERNEL_64`.
        public static let kernel64 = XLoadFlags(rawValue: 1 << 0)
        /// The kernel, boot_params, cmdline and ramdisk may be above 4 G. The corresponding C constant is `XLF_CAN_BE_LOADED_ABOVE_4G`.
        public static let canBeLoadedAbove4G = XLoadFlags(rawValue: 1 << 1)
    }
}

/// A validated bzImage: the setup header's fields and where the protected-mode kernel lies.
///
/// Every check names what is wrong, e.g. "not a bzImage: missing 'HdrS' magic at 0x202".
public struct BzImage: Sendable {
    /// The setup header bytes [0x1f1, end of header), copied verbatim into the zero page.
    public let headerBytes: [UInt8]
    public let version: UInt16
    /// Number of 512-byte setup sectors after the boot sector (0 in the file means 4).
    public let setupSects: Int
    /// Length of the protected-mode code per `syssize` (16-byte paragraphs).
    public let syssizeBytes: UInt64
    public let loadflags: BootParams.LoadFlags
    public let xloadflags: BootParams.XLoadFlags
    public let relocatable: Bool
    public let kernelAlignment: UInt32
    public let initrdAddrMax: UInt32
    /// Longest command line the kernel accepts, terminating NUL excluded.
    public let cmdlineSize: UInt32
    public let payloadOffset: UInt32
    public let payloadLength: UInt32
    public let prefAddress: UInt64
    /// Bytes of memory the kernel needs from its (aligned) run address to decompress and start.
    public let initSize: UInt32
    /// File offset of the protected-mode code: (setup_sects + 1) × 512.
    public let protectedModeOffset: UInt64
    /// Bytes of protected-mode code in the file (the rest of the file after setup).
    public let protectedModeSize: UInt64

    /// Smallest file that can hold a 2.12 setup header, up to `init_size`.
    static let minimumHeaderEnd = BootParams.initSize + 4

    public init(_ image: any ImageSource) throws {
        let fileSize = image.size
        guard fileSize >= UInt64(BootParams.headerLimit) else {
            throw MicroVMError(.invalidImage, "not a bzImage: the file has \(fileSize) bytes, too few for a setup header (needs at least \(BootParams.headerLimit))")
        }
        let head = try image.bytes(at: 0, count: BootParams.headerLimit)
        let flag: UInt16 = head.le(BootParams.bootFlag)
        guard flag == BootParams.bootFlagValue else {
            throw MicroVMError(.invalidImage, "not a bzImage (nor an ELF vmlinux): boot_flag at 0x1FE is \(hex(flag)), expected 0xAA55")
        }
        let magic: UInt32 = head.le(BootParams.header)
        guard magic == BootParams.headerMagic else {
            throw MicroVMError(.invalidImage, "not a bzImage: missing 'HdrS' magic at 0x202 (found \(hex(magic))); kernels older than 2.0 are not supported")
        }
        let version: UInt16 = head.le(BootParams.version)
        guard version >= BootParams.minimumVersion else {
            throw MicroVMError(.invalidImage, "bzImage boot protocol \(version >> 8).\(version & 0xff) is too old: 2.12 or later is needed for the 64-bit entry (Linux 3.8+)")
        }
        let headerEnd = 0x202 + Int(head[0x201])
        guard headerEnd >= Self.minimumHeaderEnd else {
            throw MicroVMError(.invalidImage, "bzImage setup header ends at \(hex(headerEnd)) (byte at 0x201), but protocol \(version >> 8).\(version & 0xff) needs it to reach \(hex(Self.minimumHeaderEnd))")
        }
        var sects = Int(head[BootParams.setupSects])
        if sects == 0 { sects = 4 }
        let pmOffset = UInt64(sects + 1) * 512
        guard pmOffset < fileSize else {
            throw MicroVMError(.invalidImage, "truncated: setup_sects says \(pmOffset) bytes of setup code, file has \(fileSize)")
        }
        let loadflags = BootParams.LoadFlags(rawValue: head[BootParams.loadflags])
        guard loadflags.contains(.loadedHigh) else {
            throw MicroVMError(.invalidImage, "bzImage loadflags \(hex(loadflags.rawValue)) lack LOADED_HIGH: a zImage loaded at 0x10000 is not supported")
        }
        let xloadflags = BootParams.XLoadFlags(rawValue: head.le(BootParams.xloadflags))
        guard xloadflags.contains(.kernel64) else {
            throw MicroVMError(.invalidImage, "bzImage xloadflags \(hex(xloadflags.rawValue)) lack XLF_KERNEL_64: this is not a 64-bit x86 kernel")
        }
        let syssize: UInt32 = head.le(BootParams.syssize)
        let sysBytes = UInt64(syssize) * 16
        let pmSize = fileSize - pmOffset
        guard syssize > 0 else {
            throw MicroVMError(.invalidImage, "bzImage syssize at 0x1F4 is 0: no protected-mode code")
        }
        guard sysBytes <= pmSize else {
            throw MicroVMError(.invalidImage, "truncated: header says \(sysBytes) bytes of protected-mode code, file has \(pmSize)")
        }
        let payloadOffset: UInt32 = head.le(BootParams.payloadOffset)
        let payloadLength: UInt32 = head.le(BootParams.payloadLength)
        guard payloadLength > 0, UInt64(payloadOffset) + UInt64(payloadLength) <= pmSize else {
            throw MicroVMError(.invalidImage, "bzImage payload [\(hex(payloadOffset)), +\(payloadLength)) lies outside the \(pmSize) bytes of protected-mode code")
        }
        let initSize: UInt32 = head.le(BootParams.initSize)
        guard UInt64(initSize) >= sysBytes else {
            throw MicroVMError(.invalidImage, "bzImage init_size \(initSize) is smaller than its own protected-mode code (\(sysBytes) bytes)")
        }
        let relocatable = head[BootParams.relocatableKernel] != 0
        let alignment: UInt32 = head.le(BootParams.kernelAlignment)
        guard !relocatable || (alignment != 0 && alignment & (alignment - 1) == 0) else {
            throw MicroVMError(.invalidImage, "bzImage kernel_alignment \(hex(alignment)) is not a power of two")
        }
        let prefAddress: UInt64 = head.le(BootParams.prefAddress)
        // Relocatable kernels still decompress at or above pref_address, so it bounds both kinds.
        guard prefAddress < Layout.mmioHoleStart, relocatable || prefAddress >= Layout.highMemoryStart else {
            throw MicroVMError(.invalidImage, "bzImage pref_address \(hex(prefAddress)) is outside [1 MiB, 3 GiB), where this VMM has RAM for the kernel")
        }

        let copyEnd = min(headerEnd, BootParams.headerLimit)
        self.headerBytes = Array(head[BootParams.setupSects..<copyEnd])
        self.version = version
        self.setupSects = sects
        self.syssizeBytes = sysBytes
        self.loadflags = loadflags
        self.xloadflags = xloadflags
        self.relocatable = relocatable
        self.kernelAlignment = alignment
        self.initrdAddrMax = head.le(BootParams.initrdAddrMax)
        self.cmdlineSize = head.le(BootParams.cmdlineSize)
        self.payloadOffset = payloadOffset
        self.payloadLength = payloadLength
        self.prefAddress = prefAddress
        self.initSize = initSize
        self.protectedModeOffset = pmOffset
        self.protectedModeSize = pmSize
    }

    /// Where the protected-mode code goes: 1 MiB for a relocatable kernel (it moves itself to an
    /// aligned address), `pref_address` for one that must run where it was linked.
    public var loadAddress: GuestAddress { relocatable ? Layout.kernelLoad : GuestAddress(prefAddress) }

    /// Highest address + 1 the kernel may touch while it decompresses and starts: the loaded
    /// image, and `init_size` bytes from the address it runs at (boot.rst, "init_size").
    public var kernelEnd: UInt64 {
        let load = loadAddress.rawValue
        var run = load
        if relocatable {
            let a = UInt64(kernelAlignment)
            run = max((load + a - 1) & ~(a - 1), prefAddress)
        }
        return max(load + protectedModeSize, run + UInt64(initSize))
    }

    /// Longest command line this kernel accepts, terminating NUL included.
    public var commandLineLimit: Int {
        min(Int(cmdlineSize) + 1, Layout.cmdlineRegionSize)
    }

    /// Builds `struct boot_params` for this kernel.
    public func zeroPage(cmdline: GuestAddress, initrd: (address: UInt64, size: UInt64)?, memoryMap: [MemoryMapEntry]) throws -> [UInt8] {
        guard memoryMap.count <= BootParams.e820MaxEntries else {
            throw MicroVMError(.internalError, "memory map has \(memoryMap.count) entries, the zero page holds \(BootParams.e820MaxEntries)")
        }
        var zp = [UInt8](repeating: 0, count: BootParams.size)
        zp.replaceSubrange(BootParams.setupSects..<(BootParams.setupSects + headerBytes.count), with: headerBytes)
        zp[BootParams.typeOfLoader] = BootParams.loaderTypeUndefined
        zp[BootParams.loadflags] |= BootParams.LoadFlags.canUseHeap.rawValue
        zp.put(BootParams.heapEnd, at: BootParams.heapEndPtr)
        zp.put(UInt32(truncatingIfNeeded: loadAddress.rawValue), at: BootParams.code32Start)
        zp.put(UInt32(truncatingIfNeeded: cmdline.rawValue), at: BootParams.cmdLinePtr)
        zp.put(UInt32(truncatingIfNeeded: cmdline.rawValue >> 32), at: BootParams.extCmdLinePtr)
        if let initrd {
            zp.put(UInt32(truncatingIfNeeded: initrd.address), at: BootParams.ramdiskImage)
            zp.put(UInt32(truncatingIfNeeded: initrd.address >> 32), at: BootParams.extRamdiskImage)
            zp.put(UInt32(truncatingIfNeeded: initrd.size), at: BootParams.ramdiskSize)
            zp.put(UInt32(truncatingIfNeeded: initrd.size >> 32), at: BootParams.extRamdiskSize)
        }
        zp[BootParams.e820Entries] = UInt8(memoryMap.count)
        for (i, e) in memoryMap.enumerated() {
            let at = BootParams.e820Table + i * BootParams.e820EntrySize
            zp.put(e.base, at: at)
            zp.put(e.size, at: at + 8)
            zp.put(e.kind.rawValue, at: at + 16)
        }
        return zp
    }
}
