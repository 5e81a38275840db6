import GuestMemory
import MicroVMCore

/// Where the direct VMM puts things in the guest's physical address space (x86_64).
///
/// The low megabyte follows Firecracker and kvmtool, so a Linux guest finds what a PC BIOS
/// would leave: page tables and descriptor tables the VMM builds, the boot structures the
/// loader writes, and the MP table where Linux scans for it. Above 1 MiB is the kernel, RAM
/// runs up to the 3 GiB MMIO hole, then resumes at 4 GiB for larger guests.
public enum Layout {
    /// GDT the VMM loads before entering the kernel (flat code/data segments, 8 bytes each).
    public static let gdt: GuestAddress = 0x500
    /// Empty IDT the VMM loads so an early fault triple-faults instead of running garbage.
    public static let idt: GuestAddress = 0x520
    /// PVH `hvm_start_info` (56 bytes); the ELF/PVH entry gets its address in EBX.
    public static let pvhStartInfo: GuestAddress = 0x6000
    /// PVH module list: one `hvm_modlist_entry` (32 bytes) for the initrd.
    public static let pvhModlist: GuestAddress = 0x6040
    /// PVH memory map: `hvm_memmap_table_entry` records (24 bytes each) up to the zero page.
    public static let pvhMemmap: GuestAddress = 0x6060
    /// How many memory map records fit between `pvhMemmap` and `zeroPage`.
    public static let pvhMemmapCapacity = Int(zeroPage.rawValue - pvhMemmap.rawValue) / 24
    /// The zero page (`struct boot_params`, 4 KiB) of the 64-bit boot protocol; RSI points here.
    public static let zeroPage: GuestAddress = 0x7000
    /// Initial stack pointer for the boot vCPU: top of the page after the zero page, 16-byte aligned.
    public static let bootStack: GuestAddress = 0x8ff0
    /// Identity page tables for the 64-bit entry: PML4, one PDPT, then page directories of 2 MiB
    /// pages from `pd` on, one per GiB mapped; up to 20 fit below `cmdline`.
    public static let pml4: GuestAddress = 0x9000
    public static let pdpt: GuestAddress = 0xa000
    public static let pd: GuestAddress = 0xb000
    /// The kernel command line, NUL terminated.
    public static let cmdline: GuestAddress = 0x20000
    /// The command-line limit when the kernel does not state one (PVH, or boot protocol < 2.06):
    /// x86 Linux's COMMAND_LINE_SIZE, terminating NUL included.
    public static let cmdlineMaxSize = KernelCommandLine.maxBytes
    /// Room reserved at `cmdline` for a kernel that declares a longer `cmdline_size`.
    public static let cmdlineRegionSize = 0x10000
    /// The MP floating pointer and configuration table, in the last KiB of base memory (the
    /// EBDA) — one of the places Linux scans for "_MP_". From here to 1 MiB is reserved in e820.
    public static let mpTable: GuestAddress = 0x9fc00
    /// The ACPI RSDP, in the BIOS area where Linux's legacy scan looks; the other tables follow
    /// it, all inside the range e820 already reserves below 1 MiB.
    public static let acpiRSDP: GuestAddress = 0xe0000
    /// The ACPI tables end by here.
    public static let acpiEnd: UInt64 = 0x10_0000
    /// End of conventional memory as reported in e820 (start of the EBDA/VGA/BIOS hole).
    public static let ebdaStart: UInt64 = 0x9fc00
    /// Start of "high" memory: the bzImage's protected-mode code is loaded here.
    public static let kernelLoad: GuestAddress = 0x10_0000
    public static let highMemoryStart: UInt64 = 0x10_0000
    /// RAM below 4 GiB stops here; [3 GiB, 4 GiB) is for device MMIO, the IOAPIC and the LAPIC.
    public static let mmioHoleStart: UInt64 = GuestRAM.mmioHoleStart
    /// RAM resumes here for guests larger than 3 GiB.
    public static let mmioHoleEnd: UInt64 = GuestRAM.mmioHoleEnd
    /// Base of the window where virtio-mmio devices are placed (the virtio engineer allocates
    /// slots inside it; Linux learns them from `virtio_mmio.device=` command-line entries).
    public static let virtioMMIOBase: GuestAddress = 0xd000_0000
    /// Size of the virtio-mmio window (it stops well below the IOAPIC).
    public static let virtioMMIOSize: UInt64 = 0x1000_0000
    /// IOAPIC MMIO base, as named in the MP table.
    public static let ioapic: GuestAddress = 0xfec0_0000
    /// Local APIC MMIO base, as named in the MP table.
    public static let localAPIC: GuestAddress = 0xfee0_0000
    /// The I/O ports the legacy devices answer on; the VMM inserts the devices here on its PIO bus.
    public static let serialCOM1Port: UInt64 = 0x3f8
    public static let serialCOM1IRQ: UInt32 = 4
    public static let i8042Port: UInt64 = 0x60
}
