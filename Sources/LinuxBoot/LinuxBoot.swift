/// LinuxBoot: puts a Linux kernel, its initrd and command line into guest memory the way a
/// boot loader would, and says where and how to enter it. A bzImage is entered at its 64-bit
/// entry with a zero page (`boot_params`); an ELF vmlinux through its PVH entry with an
/// `hvm_start_info`. An MP table describes the vCPUs. Knows guest memory, not KVM.
///
/// ```swift
/// let mem = try GuestRAM(size: .mebibytes(256))
/// let entry = try LinuxLoader.load(kernelPath: "/boot/vmlinuz", initrdPath: "initrd.img",
///                                  cmdline: "console=ttyS0 reboot=k", memory: mem, cpus: 2)
/// switch entry.mode {
/// case .long64(let zeroPage): // RIP = entry.entry, RSI = zeroPage, long mode with paging
/// case .pvh32(let startInfo): // RIP = entry.entry, EBX = startInfo, 32-bit protected mode
/// }
/// ```
import MicroVMCore
import GuestMemory

/// Where and how the vCPU enters the loaded kernel.
public struct KernelEntry: Sendable, Equatable {
    public enum Mode: Sendable, Equatable {
        /// 64-bit boot protocol: long mode, identity-mapped paging, RSI = the zero page.
        case long64(bootParams: GuestAddress)
        /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
        case pvh32(startInfo: GuestAddress)
    }
    public var entry: GuestAddress
    public var mode: Mode
    public init(entry: GuestAddress, mode: Mode) { self.entry = entry; self.mode = mode }
}

public enum LinuxLoader {
    /// Loads the kernel at `kernelPath` (a bzImage or an ELF vmlinux with a PVH note, told apart
    /// by content), the optional initrd and the command line into `memory`, and writes the MP
    /// table and the ACPI tables (which also describe `virtioMMIO`) for `cpus` vCPUs.
    public static func load(kernelPath: String, initrdPath: String?, cmdline: String, memory: any GuestMemory, cpus: Int, virtioMMIO: [ACPIMMIODevice] = []) throws -> KernelEntry {
        let kernel = try ImageFile(path: kernelPath)
        let initrd = try initrdPath.map { try ImageFile(path: $0) }
        do {
            return try load(kernel: kernel, initrd: initrd, cmdline: cmdline, memory: memory, cpus: cpus, virtioMMIO: virtioMMIO)
        } catch var e as MicroVMError where e.code == .invalidImage {
            e.message = "\(kernelPath): \(e.message)"
            throw e
        }
    }

    /// As above, from any image source (tests pass in-memory images).
    public static func load(kernel: any ImageSource, initrd: (any ImageSource)?, cmdline: String, memory: any GuestMemory, cpus: Int, virtioMMIO: [ACPIMMIODevice] = []) throws -> KernelEntry {
        let map = try MemoryMap.entries(for: memory)
        try MPTable.write(cpus: cpus, memory: memory)
        // ACPI only when there are virtio-mmio devices to describe: with our hardware-reduced FADT,
        // Linux maps no legacy ISA IRQs, so the UART (IRQ 4) and the i8042 (IRQ 1) lose their
        // interrupts until the DSDT describes them too; the MP table alone keeps them working.
        let rsdp = virtioMMIO.isEmpty ? nil : try ACPITables.write(into: memory, cpus: cpus, virtioMMIO: virtioMMIO)
        if ElfKernel.isELF(kernel) {
            return try loadELF(ElfKernel(kernel), from: kernel, initrd: initrd, cmdline: cmdline, memory: memory, map: map, rsdp: rsdp)
        }
        return try loadBzImage(BzImage(kernel), from: kernel, initrd: initrd, cmdline: cmdline, memory: memory, map: map, rsdp: rsdp)
    }

    static func loadBzImage(_ bz: BzImage, from image: any ImageSource, initrd: (any ImageSource)?, cmdline: String, memory: any GuestMemory, map: [MemoryMapEntry], rsdp: GuestAddress? = nil) throws -> KernelEntry {
        let lowEnd = MemoryMap.lowRAMEnd(map)
        guard bz.kernelEnd <= lowEnd else {
            throw MicroVMError.invalidArgument("guest memory of \(ByteCount(memory.end.rawValue)) is too small for this kernel: it needs RAM up to \(hex(bz.kernelEnd)) (init_size \(bz.initSize)); give the VM at least \((bz.kernelEnd >> 20) + 16)M")
        }
        try image.copy(offset: bz.protectedModeOffset, count: bz.protectedModeSize, to: memory, at: bz.loadAddress)
        try writeCommandLine(cmdline, limit: bz.commandLineLimit, memory: memory)
        let limit = min(UInt64(bz.initrdAddrMax) + 1, lowEnd)
        let placed = try initrd.map { try placeInitrd($0, above: bz.kernelEnd, below: limit, memory: memory) }
        var zp = try bz.zeroPage(cmdline: Layout.cmdline, initrd: placed, memoryMap: map)
        // Kernels older than protocol 2.14 ignore the field and find the RSDP by scanning.
        if let rsdp { zp.put(rsdp.rawValue, at: BootParams.acpiRSDPAddr) }
        try memory.writeBytes(zp, at: Layout.zeroPage)
        // The 64-bit entry point sits 0x200 past the start of the protected-mode code.
        return KernelEntry(entry: GuestAddress(bz.loadAddress.rawValue + 0x200), mode: .long64(bootParams: Layout.zeroPage))
    }

    static func loadELF(_ elf: ElfKernel, from image: any ImageSource, initrd: (any ImageSource)?, cmdline: String, memory: any GuestMemory, map: [MemoryMapEntry], rsdp: GuestAddress? = nil) throws -> KernelEntry {
        guard let pvh = elf.pvhEntry else {
            throw MicroVMError(.invalidImage, "ELF vmlinux has no PVH entry (Xen ELF note type 18): build the kernel with CONFIG_PVH=y, or boot its bzImage instead")
        }
        try elf.load(from: image, into: memory)
        try writeCommandLine(cmdline, limit: Layout.cmdlineMaxSize, memory: memory)
        let placed = try initrd.map { try placeInitrd($0, above: elf.end, below: MemoryMap.lowRAMEnd(map), memory: memory) }
        try PVHStartInfo.write(cmdline: Layout.cmdline, initrd: placed, memoryMap: map, rsdp: rsdp, to: memory)
        return KernelEntry(entry: GuestAddress(UInt64(pvh)), mode: .pvh32(startInfo: Layout.pvhStartInfo))
    }

    /// Writes the NUL-terminated command line at `Layout.cmdline`.
    static func writeCommandLine(_ cmdline: String, limit: Int, memory: any GuestMemory) throws {
        let bytes = Array(cmdline.utf8)
        guard !bytes.contains(0) else {
            throw MicroVMError.invalidArgument("the kernel command line contains a NUL byte")
        }
        guard bytes.count + 1 <= limit else {
            throw MicroVMError.invalidArgument("the kernel command line is \(bytes.count) bytes; this kernel accepts at most \(limit - 1): shorten the command or its arguments")
        }
        try memory.writeBytes(bytes + [0], at: Layout.cmdline)
    }

    /// Puts the initrd at the highest page-aligned address that ends at or below `below` and
    /// starts at or above `above` (the kernel's end), as boot loaders do.
    static func placeInitrd(_ initrd: any ImageSource, above: UInt64, below: UInt64, memory: any GuestMemory) throws -> (address: UInt64, size: UInt64) {
        let size = initrd.size
        let floor = (above + 0xfff) & ~0xfff
        guard size > 0 else {
            throw MicroVMError(.invalidImage, "the initrd is empty: rebuild the image (`mvm image build`)")
        }
        guard below > floor, size <= below - floor else {
            throw MicroVMError.invalidArgument("the \(ByteCount(size)) initrd does not fit between the kernel's end \(hex(floor)) and \(hex(below)): give the VM more memory")
        }
        let address = (below - size) & ~0xfff
        try initrd.copy(offset: 0, count: size, to: memory, at: GuestAddress(address))
        return (address, size)
    }
}
