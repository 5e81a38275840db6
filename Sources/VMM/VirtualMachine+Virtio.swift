import Devices
import LinuxBoot
import MicroVMCore

extension VirtualMachine {
    /// Places the spec's virtio devices (disks, the network on `tap`, then entropy) on the MMIO bus, each interrupting
    /// through its own GSI, and starts their I/O threads. The returned kernel parameters tell a
    /// guest built with VIRTIO_MMIO_CMDLINE_DEVICES where they are. Call `stop()` on each
    /// attachment after the VM ends. With `startThreads: false` the caller starts them
    /// (`startVirtioThreads`), e.g. once the VMM is jailed.
    public func installVirtioDevices(spec: VMSpec, tap: TapDevice? = nil, mac: [UInt8]? = nil,
                                     startThreads: Bool = true) throws -> (attachments: [VirtioAttachment], cmdline: String) {
        let attachments = try VirtioDevices.make(spec: spec, memory: memory, tap: tap, mac: mac) { gsi -> any InterruptLine in
            // irqfd where KVM takes it (an in-kernel irqchip), else the KVM_IRQ_LINE pulse.
            if let line = try? KVMIRQFDLine(vm: self.vm, gsi: gsi) {
                self.irqfdsRegistered.add(1, ordering: .relaxed)
                return line
            }
            return self.interruptLine(gsi: gsi)
        }
        do {
            for a in attachments {
                try addMMIODevice(a.device, address: a.mmioBase, length: a.mmioLength)
                registerNotifyEventFDs(a)
            }
            if startThreads { try startVirtioThreads(attachments) }
        } catch {
            attachments.forEach { $0.stop() }
            throw error
        }
        return (attachments, attachments.map(\.cmdline).joined(separator: " "))
    }

    /// Starts each device's I/O thread; `onThread` runs first on each.
    public func startVirtioThreads(_ attachments: [VirtioAttachment], onThread: (@Sendable () -> Void)? = nil) throws {
        for a in attachments { try a.transport.start(name: "virtio-\(a.irq)", onThread: onThread) }
    }

    /// Lets a QueueNotify write signal the queue's eventfd inside KVM (KVM_IOEVENTFD, 4 bytes at
    /// the notify register, datamatch = queue index), so a kick costs no exit to the VMM. Where
    /// KVM refuses (an old or software KVM), the MMIO exit path serves the same notify.
    @discardableResult
    func registerNotifyEventFDs(_ a: VirtioAttachment) -> Int {
        var registered = 0
        for q in 0..<a.transport.queueCount {
            guard let fd = a.transport.notifyEventFD(queue: q) else { continue }
            do {
                try vm.registerIOEventFD(eventFD: fd, address: a.mmioBase + VirtioMMIOTransport.notifyOffset, length: 4, datamatch: UInt64(q))
                registered += 1
            } catch {
                break
            }
        }
        ioeventfdsRegistered.add(registered, ordering: .relaxed)
        return registered
    }
}

extension VirtioAttachment {
    /// The device as the loader's ACPI tables describe it.
    public var acpiDevice: ACPIMMIODevice { ACPIMMIODevice(base: mmioBase, length: mmioLength, gsi: irq) }
}
