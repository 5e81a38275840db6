import CKVM
import MicroVMCore
#if canImport(Glibc)
import Glibc
#endif

/// A KVM VM: guest memory slots, the in-kernel interrupt controllers and timer, interrupt
/// injection, eventfd wiring, and vCPU creation.
public final class KVMVirtualMachine: Sendable {
    let fd: OwnedFD
    public let system: KVMSystem
    let runSize: Int

    init(fd: OwnedFD, system: KVMSystem, runSize: Int) {
        self.fd = fd; self.system = system; self.runSize = runSize
    }

    /// Maps `size` bytes of host memory at `host` into the guest at `guestAddress`.
    /// The caller keeps the host mapping alive for as long as this VM exists.
    public func setUserMemoryRegion(slot: UInt32, guestAddress: UInt64, size: UInt64, host: UnsafeMutableRawPointer, readOnly: Bool = false) throws {
        var region = kvm_userspace_memory_region(slot: slot, flags: readOnly ? UInt32(KVM_MEM_READONLY) : 0,
                                                 guest_phys_addr: guestAddress, memory_size: size,
                                                 userspace_addr: UInt64(UInt(bitPattern: host)))
        try kvmIoctl(fd.raw, CKVM_SET_USER_MEMORY_REGION, "KVM_SET_USER_MEMORY_REGION", &region)
    }

    /// Where the three pages KVM needs for real-mode emulation on Intel live (below 4 GiB,
    /// outside RAM and MMIO). Firecracker and QEMU use 0xfffbd000.
    public func setTSSAddress(_ address: UInt64) throws {
        try kvmIoctl(fd.raw, CKVM_SET_TSS_ADDR, "KVM_SET_TSS_ADDR", argument: UInt(address))
    }

    /// The page KVM uses for the identity map of unrestricted-guest-less Intel CPUs.
    public func setIdentityMapAddress(_ address: UInt64) throws {
        var a = address
        try kvmIoctl(fd.raw, CKVM_SET_IDENTITY_MAP_ADDR, "KVM_SET_IDENTITY_MAP_ADDR", &a)
    }

    /// The in-kernel PIC pair, IOAPIC and per-vCPU LAPICs. Must precede vCPU creation.
    public func createIRQChip() throws {
        try kvmIoctl(fd.raw, CKVM_CREATE_IRQCHIP, "KVM_CREATE_IRQCHIP")
    }

    /// The in-kernel i8254 PIT (Linux calibrates its TSC against it), with the speaker port dummy.
    public func createPIT2() throws {
        var config = kvm_pit_config()
        config.flags = CKVM_PIT_SPEAKER_DUMMY
        try kvmIoctl(fd.raw, CKVM_CREATE_PIT2, "KVM_CREATE_PIT2", &config)
    }

    /// Drives a GSI of the in-kernel irqchip high or low.
    public func setIRQLine(_ irq: UInt32, level: Bool) throws {
        var l = kvm_irq_level()
        l.irq = irq
        l.level = level ? 1 : 0
        try kvmIoctl(fd.raw, CKVM_IRQ_LINE, "KVM_IRQ_LINE", &l)
    }

    /// Makes a write to `eventFD` inject `gsi` without a trip through the VMM.
    public func registerIRQFD(_ eventFD: EventFD, gsi: UInt32) throws {
        var r = kvm_irqfd()
        r.fd = UInt32(bitPattern: eventFD.fd.raw)
        r.gsi = gsi
        try kvmIoctl(fd.raw, CKVM_IRQFD, "KVM_IRQFD", &r)
    }

    public func unregisterIRQFD(_ eventFD: EventFD, gsi: UInt32) throws {
        var r = kvm_irqfd()
        r.fd = UInt32(bitPattern: eventFD.fd.raw)
        r.gsi = gsi
        r.flags = CKVM_IRQFD_FLAG_DEASSIGN
        try kvmIoctl(fd.raw, CKVM_IRQFD, "KVM_IRQFD(deassign)", &r)
    }

    /// Makes a guest write of `length` bytes at `address` (MMIO, or a port when `pio`) signal
    /// `eventFD` instead of exiting to the VMM; with `datamatch`, only writes of that value.
    public func registerIOEventFD(_ eventFD: EventFD, address: UInt64, length: UInt32, pio: Bool = false, datamatch: UInt64? = nil) throws {
        try registerIOEventFD(eventFD: eventFD.fd.raw, address: address, length: length, pio: pio, datamatch: datamatch)
    }

    /// The same for an eventfd owned elsewhere (a device's); it must outlive the registration
    /// or the VM (KVM holds its own reference to the eventfd).
    public func registerIOEventFD(eventFD: Int32, address: UInt64, length: UInt32, pio: Bool = false, datamatch: UInt64? = nil) throws {
        var r = kvm_ioeventfd()
        r.addr = address
        r.len = length
        r.fd = eventFD
        r.flags = (pio ? CKVM_IOEVENTFD_FLAG_PIO : 0) | (datamatch != nil ? CKVM_IOEVENTFD_FLAG_DATAMATCH : 0)
        r.datamatch = datamatch ?? 0
        try kvmIoctl(fd.raw, CKVM_IOEVENTFD, "KVM_IOEVENTFD", &r)
    }

    public func createVCPU(id: UInt32) throws -> KVMVCPU {
        let raw = try kvmIoctl(fd.raw, CKVM_CREATE_VCPU, "KVM_CREATE_VCPU", argument: UInt(id))
        let owned = OwnedFD(raw)
        let p = mmap(nil, runSize, PROT_READ | PROT_WRITE, MAP_SHARED, raw, 0)
        guard let p, p != MAP_FAILED else {
            throw MicroVMError(.hypervisor, "cannot map the kvm_run page of vCPU \(id)", cause: SystemCallError("mmap", errno: errno))
        }
        return KVMVCPU(fd: owned, id: id, run: p, runSize: runSize)
    }
}
