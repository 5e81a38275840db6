import Devices
import MicroVMCore

extension VirtualMachine {
    /// Places the spec's virtio devices (disks, then entropy) on the MMIO bus, each interrupting
    /// through its own GSI, and starts their I/O threads. The returned kernel parameters tell a
    /// guest built with VIRTIO_MMIO_CMDLINE_DEVICES where they are. Call `stop()` on each
    /// attachment after the VM ends.
    public func installVirtioDevices(spec: VMSpec) throws -> (attachments: [VirtioAttachment], cmdline: String) {
        let attachments = try VirtioDevices.make(spec: spec, memory: memory) { self.interruptLine(gsi: $0) }
        do {
            for a in attachments {
                try addMMIODevice(a.device, address: a.mmioBase, length: a.mmioLength)
                a.transport.start(name: "virtio-\(a.irq)")
            }
        } catch {
            attachments.forEach { $0.stop() }
            throw error
        }
        return (attachments, attachments.map(\.cmdline).joined(separator: " "))
    }
}
