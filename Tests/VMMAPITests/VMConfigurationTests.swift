import Foundation
import Testing
@testable import VMMAPI

struct VMConfigurationTests {
    /// Firecracker's own `--config-file` example, field for field.
    @Test func firecrackersConfigFileDecodes() throws {
        let json = """
            {"boot-source": {"kernel_image_path": "vmlinux.bin", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"},
             "drives": [{"drive_id": "rootfs", "path_on_host": "bionic.rootfs.ext4", "is_root_device": true, "is_read_only": false}],
             "machine-config": {"vcpu_count": 2, "mem_size_mib": 1024, "smt": false, "track_dirty_pages": false}}
            """
        let c = try JSONDecoder().decode(VMConfiguration.self, from: Data(json.utf8))
        #expect(c.machineConfig.vcpuCount == 2 && c.machineConfig.memSizeMib == 1024)
        #expect(c.bootSource?.kernelImagePath == "vmlinux.bin" && c.bootSource?.initrdPath == nil)
        #expect(c.drives.map(\.driveId) == ["rootfs"] && c.drives[0].isRootDevice && c.drives[0].isReadOnly == false)
        #expect(c.networkInterfaces.isEmpty && c.vsock == nil)
        let again = try JSONDecoder().decode(VMConfiguration.self, from: JSONEncoder().encode(c))
        #expect(again == c)
    }
}
