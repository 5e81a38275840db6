import Foundation
import MicroVMCore
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
        let c = try VMConfiguration(parsing: Array(json.utf8))
        #expect(c.machineConfig.vcpuCount == 2 && c.machineConfig.memSizeMib == 1024)
        #expect(c.bootSource?.kernelImagePath == "vmlinux.bin" && c.bootSource?.initrdPath == nil)
        #expect(c.drives.map(\.driveId) == ["rootfs"] && c.drives[0].isRootDevice && c.drives[0].isReadOnly == false)
        #expect(c.networkInterfaces.isEmpty && c.vsock == nil)
        let again = try VMConfiguration(parsing: JSONEncoder().encode(c))
        #expect(again == c)
    }

    /// Every field the encoder writes, the reader reads back: the two name each field alike.
    @Test func everyFieldRoundTrips() throws {
        var c = VMConfiguration(
            machineConfig: MachineConfig(vcpuCount: 4, memSizeMib: 512, smt: true, trackDirtyPages: false, hugePages: "2M"),
            bootSource: BootSource(kernelImagePath: "/k", initrdPath: "/i", bootArgs: "console=ttyS0 \"quoted\" é \u{1F600}"),
            drives: [Drive(driveId: "root", pathOnHost: "/r", isRootDevice: true, isReadOnly: true, partuuid: "p", cacheType: "Writeback", ioEngine: "Sync"),
                     Drive(driveId: "data", pathOnHost: "/d")],
            networkInterfaces: [NetworkInterface(ifaceId: "eth0", hostDevName: "tap0", guestMac: "06:00:00:00:00:01")],
            vsock: Vsock(guestCid: UInt32.max - 1, udsPath: "/v", vsockId: "vs"),
            logger: Logger(logPath: "/l", level: "Info", showLevel: true, showLogOrigin: false, module: "m"),
            metrics: Metrics(metricsPath: "/m"),
            balloon: Balloon(amountMib: 64, deflateOnOom: true, statsPollingIntervalS: 5, freePageReporting: true))
        c.vcpuPins = [[0, 1], [1]]
        let encoded = try JSONEncoder().encode(c)
        #expect(try VMConfiguration(parsing: encoded) == c)
    }

    /// A configuration file's mistakes are named by their place in the document.
    @Test(arguments: [
        (#"{"machine-config": {"vcpu_count": 1}}"#, "missing required field `mem_size_mib` in `machine-config`"),
        (#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T2"}}"#, "unknown field `machine-config.cpu_template`"),
        (#"{"drives": [{"drive_id": "a", "path_on_host": "/a", "is_root_device": true}, {"drive_id": "b", "path_on_host": 7, "is_root_device": false}]}"#,
         "field `drives[1].path_on_host` must be a string, not a number"),
        (#"{"vsock": {"guest_cid": 3.5, "uds_path": "/v"}}"#, "field `vsock.guest_cid` must be an integer in 0...4294967295 (got 3.5)"),
        (#"{"boot-source": null, "drives": {}}"#, "field `drives` must be an array, not an object"),
        (#"{"boot-source": {"kernel_image_path": null}}"#, "field `boot-source.kernel_image_path` must not be null"),
        (#"{"machine-configuration": {}}"#, "unknown field `machine-configuration`"),
        (#"{"x-mvm-vcpu-pins": [[0], [-1]]}"#, "field `x-mvm-vcpu-pins[1]` must hold CPU numbers from 0 to 4095"),
        (#"["machine-config"]"#, "the document must be a JSON object, not an array"),
        (#"{"machine-config": {"vcpu_count": 1,}"#, "not valid JSON"),
    ])
    func configurationErrorsNameTheField(json: String, message: String) {
        #expect {
            try VMConfiguration(parsing: Array(json.utf8))
        } throws: { error in
            "\(error)".contains(message)
        }
    }
}
