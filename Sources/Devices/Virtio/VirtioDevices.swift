import GuestMemory
import MicroVMCore

/// One virtio-mmio device placed in the guest: where it sits, its IRQ, and the kernel parameter
/// that tells Linux about it (there is no device tree or ACPI in the direct VMM).
public struct VirtioAttachment: Sendable {
    public let transport: VirtioMMIOTransport
    public var device: any BusDevice { transport }
    public let mmioBase: UInt64
    public let mmioLength: UInt64
    public let irq: UInt32
    /// A host resource the device uses (a tap), closed after the I/O thread has stopped.
    public let backing: TapDevice?
    public var cmdline: String { "virtio_mmio.device=4K@0x\(String(mmioBase, radix: 16)):\(irq)" }
    /// Joins the device's I/O thread, stops any worker outside the process (vhost), then closes
    /// what backs the device.
    public func stop() {
        transport.stop()
        transport.device.reset()
        backing?.close()
    }
}

/// Places the virtio devices a `VMSpec` asks for: disks first (so the first is /dev/vda), then
/// the network interface on `tap` (eth0), vsock, the balloon, then the entropy device. Bases from 0xd000_0000 step
/// 4 KiB; IRQs from 5 up, skipping reserved ones.
///
/// ```swift
/// let devs = try VirtioDevices.make(spec: spec, memory: vm.memory) { vm.interruptLine(gsi: $0) }
/// for d in devs { try vm.addMMIODevice(d.device, address: d.mmioBase, length: d.mmioLength) }
/// ```
public enum VirtioDevices {
    public static let firstBase: UInt64 = 0xd000_0000
    public static let stride: UInt64 = 0x1000
    public static let firstIRQ: UInt32 = 5
    /// COM1 (4), the RTC (8) and the legacy IDE lines the kernel may still probe.
    public static let reservedIRQs: Set<UInt32> = [4, 8, 14, 15]
    /// IOAPIC pins above the legacy ones run out at 23.
    public static let lastIRQ: UInt32 = 23

    public static func make(spec: VMSpec, memory: any GuestMemory, tap: TapDevice? = nil, mac: [UInt8]? = nil,
                            interrupt: (UInt32) -> any InterruptLine) throws -> [VirtioAttachment] {
        if spec.net != nil, tap == nil {
            throw MicroVMError.invalidArgument("the spec asks for a network but no tap device was opened for it")
        }
        var devices: [(any VirtioDevice, TapDevice?)] = []
        for d in spec.disks { devices.append((try VirtioBlock(path: d.path, readOnly: d.readOnly, direct: d.direct), nil)) }
        if let tap {
            let net = VirtioNet(tapFD: tap.fd, mac: mac ?? HostLinks.mac(seed: spec.name), applyOffloads: { tap.setOffloads($0) })
            devices.append((net, tap))
        }
        if let cid = spec.vsockCID {
            guard let ram = memory as? GuestRAM else {
                throw MicroVMError.unsupported("virtio-vsock needs guest RAM with host mappings for vhost")
            }
            devices.append((try VirtioVsock(cid: cid, regions: ram.regions), nil))
        }
        if let b = spec.balloon {
            guard b.amount.bytes % VirtioBalloon.pageSize == 0, b.amount < spec.memory else {
                throw MicroVMError.invalidArgument("a balloon of \(b.amount) must be a whole number of 4K pages and smaller than the guest's \(spec.memory)")
            }
            let options = VirtioBalloon.Options(deflateOnOOM: b.deflateOnOOM, statsInterval: b.statsInterval, freePageReporting: b.freePageReporting)
            devices.append((try VirtioBalloon(targetPages: UInt32(b.amount.bytes / VirtioBalloon.pageSize), options: options, memory: memory), nil))
        }
        devices.append((VirtioRng(), nil))

        var out: [VirtioAttachment] = []
        var irq = firstIRQ
        for (i, (dev, backing)) in devices.enumerated() {
            while reservedIRQs.contains(irq) { irq += 1 }
            guard irq <= lastIRQ else {
                throw MicroVMError.invalidArgument("too many virtio devices (\(devices.count)): the IOAPIC has no free line left; attach fewer disks")
            }
            let t = try VirtioMMIOTransport(device: dev, memory: memory, interrupt: interrupt(irq))
            if let balloon = dev as? VirtioBalloon { balloon.onConfigChange { [weak t] in t?.configChanged() } }
            out.append(VirtioAttachment(transport: t, mmioBase: firstBase + UInt64(i) * stride, mmioLength: stride, irq: irq, backing: backing))
            irq += 1
        }
        return out
    }
}
