import Foundation
import Testing
import MicroVMCore
@testable import VMMAPI

/// One request against a router whose VMM is in `phase`, and what must come back.
struct RouterCase: Sendable, CustomTestStringConvertible {
    var phase: InstanceState
    var method: String
    var path: String
    var body: String?
    var status: Int
    /// A substring of the `fault_message` (400s only).
    var fault: String?
    /// The router's configuration before the request (nil: empty).
    var configuration: VMConfiguration?

    init(_ phase: InstanceState = .notStarted, _ method: String, _ path: String, _ body: String? = nil, _ status: Int, _ fault: String? = nil,
         configuration: VMConfiguration? = nil) {
        self.phase = phase; self.method = method; self.path = path; self.body = body; self.status = status; self.fault = fault
        self.configuration = configuration
    }

    var testDescription: String { "[\(phase.rawValue)] \(method) \(path) \(body ?? "") → \(status)" }
}

let machine = #"{"vcpu_count": 2, "mem_size_mib": 256}"#
let kernel = #"{"kernel_image_path": "/k/vmlinux", "boot_args": "console=ttyS0"}"#
let rootfs = #"{"drive_id": "rootfs", "path_on_host": "/i/root.ext4", "is_root_device": true, "is_read_only": false}"#
let eth0 = #"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02"}"#
let vsock = #"{"guest_cid": 3, "uds_path": "/tmp/v.sock"}"#
let logger = #"{"log_path": "/tmp/fc.log", "level": "debug", "show_level": true}"#
let metrics = #"{"metrics_path": "/tmp/fc.metrics"}"#

let balloon = #"{"amount_mib": 64, "deflate_on_oom": true, "stats_polling_interval_s": 1, "free_page_reporting": true}"#
/// A 256 MiB machine with a balloon whose statistics are on.
let withBalloon: VMConfiguration = {
    var c = VMConfiguration(machineConfig: MachineConfig(vcpuCount: 1, memSizeMib: 256))
    c.balloon = Balloon(amountMib: 0, deflateOnOom: true, statsPollingIntervalS: 1, freePageReporting: true)
    return c
}()
let withQuietBalloon: VMConfiguration = {
    var c = withBalloon
    c.balloon?.statsPollingIntervalS = 0
    return c
}()

let routerCases: [RouterCase] = [
    // Reads: any phase.
    RouterCase(.notStarted, "GET", "/", nil, 200),
    RouterCase(.running, "GET", "/", nil, 200),
    RouterCase(.notStarted, "GET", "/version", nil, 200),
    RouterCase(.notStarted, "GET", "/machine-config", nil, 200),
    RouterCase(.running, "GET", "/machine-config", nil, 200),
    RouterCase(.notStarted, "GET", "/vm/config", nil, 200),
    RouterCase(.paused, "GET", "/vm/config", nil, 200),
    RouterCase(.notStarted, "GET", "/metrics", nil, 200),
    RouterCase(.notStarted, "GET", "/machine-config/", nil, 200),
    RouterCase(.notStarted, "GET", "/version?verbose=1", nil, 200),

    // machine-config.
    RouterCase(.notStarted, "PUT", "/machine-config", machine, 204),
    RouterCase(.notStarted, "PUT", "/machine-config", #"{"vcpu_count": 32, "mem_size_mib": 16, "huge_pages": "2M", "smt": false, "track_dirty_pages": true}"#, 204),
    RouterCase(.notStarted, "PUT", "/machine-config", #"{"vcpu_count": 0, "mem_size_mib": 256}"#, 400, "vcpu_count"),
    RouterCase(.notStarted, "PUT", "/machine-config", #"{"vcpu_count": 33, "mem_size_mib": 256}"#, 400, "vcpu_count"),
    RouterCase(.notStarted, "PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 8}"#, 400, "mem_size_mib"),
    RouterCase(.notStarted, "PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "1G"}"#, 400, "huge_pages"),
    RouterCase(.notStarted, "PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 129, "huge_pages": "2M"}"#, 400, "multiple of 2"),
    RouterCase(.notStarted, "PUT", "/machine-config", #"{"vcpu_count": 3, "mem_size_mib": 128, "smt": true}"#, 400, "smt"),
    RouterCase(.notStarted, "PUT", "/machine-config", #"{"mem_size_mib": 128}"#, 400, "missing required field `vcpu_count`"),
    RouterCase(.notStarted, "PUT", "/machine-config", #"{"vcpu_count": "two", "mem_size_mib": 128}"#, 400, "`vcpu_count` must be an integer"),
    RouterCase(.notStarted, "PUT", "/machine-config", #"{"vcpu_count": 1.5, "mem_size_mib": 128}"#, 400, "vcpu_count"),
    RouterCase(.notStarted, "PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 128, "smt": "no"}"#, 400, "`smt` must be a boolean"),
    RouterCase(.notStarted, "PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T2"}"#, 400, "unknown field `cpu_template`"),
    RouterCase(.notStarted, "PUT", "/machine-config", #"{"vcpu_count": 1,"#, 400, "not valid JSON"),
    RouterCase(.notStarted, "PUT", "/machine-config", "", 400, "needs a JSON body"),
    RouterCase(.notStarted, "PUT", "/machine-config", "[1, 2]", 400, "JSON object"),
    RouterCase(.running, "PUT", "/machine-config", machine, 400, "not supported after starting the microVM"),
    RouterCase(.notStarted, "PATCH", "/machine-config", #"{"mem_size_mib": 512}"#, 204),
    RouterCase(.notStarted, "PATCH", "/machine-config", "{}", 400, "no field"),
    RouterCase(.notStarted, "PATCH", "/machine-config", #"{"vcpu_count": 64}"#, 400, "vcpu_count"),
    RouterCase(.notStarted, "PATCH", "/machine-config", #"{"mem_size_mib": "lots"}"#, 400, "mem_size_mib"),
    RouterCase(.running, "PATCH", "/machine-config", #"{"mem_size_mib": 512}"#, 400, "after starting"),
    RouterCase(.running, "PATCH", "/machine-config", #"{"vcpu_count": 2, "smt": true}"#, 400, "changes vcpu_count only"),
    RouterCase(.running, "PATCH", "/machine-config", #"{"vcpu_count": 2}"#, 400, "no CPU hotplug"),

    // boot-source.
    RouterCase(.notStarted, "PUT", "/boot-source", kernel, 204),
    RouterCase(.notStarted, "PUT", "/boot-source", #"{"boot_args": "quiet"}"#, 400, "kernel_image_path"),
    RouterCase(.notStarted, "PUT", "/boot-source", #"{"kernel_image_path": ""}"#, 400, "kernel_image_path"),
    RouterCase(.running, "PUT", "/boot-source", kernel, 400, "after starting"),

    // drives.
    RouterCase(.notStarted, "PUT", "/drives/rootfs", rootfs, 204),
    RouterCase(.notStarted, "PUT", "/drives/data", rootfs, 400, "does not match"),
    RouterCase(.notStarted, "PUT", "/drives/root-fs", rootfs, 400, "drive_id `root-fs` is invalid"),
    RouterCase(.notStarted, "PUT", "/drives/rootfs", #"{"drive_id": "rootfs", "is_root_device": true}"#, 400, "path_on_host"),
    RouterCase(.notStarted, "PUT", "/drives/rootfs", #"{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true, "cache_type": "Fast"}"#, 400, "cache_type"),
    RouterCase(.notStarted, "PUT", "/drives/rootfs", #"{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true, "io_engine": "Uring"}"#, 400, "io_engine"),
    RouterCase(.notStarted, "PUT", "/drives/rootfs", #"{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true, "rate_limiter": {}}"#, 400, "unknown field `rate_limiter`"),
    RouterCase(.notStarted, "PUT", "/drives", rootfs, 400, "Invalid request method and/or path"),
    RouterCase(.notStarted, "PATCH", "/drives/rootfs", #"{"drive_id": "rootfs", "path_on_host": "/new"}"#, 400, "PATCH /drives/{drive_id}"),
    RouterCase(.running, "PUT", "/drives/rootfs", rootfs, 400, "after starting"),

    // network-interfaces.
    RouterCase(.notStarted, "PUT", "/network-interfaces/eth0", eth0, 204),
    RouterCase(.notStarted, "PUT", "/network-interfaces/eth1", eth0, 400, "does not match"),
    RouterCase(.notStarted, "PUT", "/network-interfaces/eth0", #"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC"}"#, 400, "guest_mac"),
    RouterCase(.notStarted, "PUT", "/network-interfaces/eth0", #"{"iface_id": "eth0"}"#, 400, "host_dev_name"),
    RouterCase(.notStarted, "PATCH", "/network-interfaces/eth0", #"{"iface_id": "eth0"}"#, 400, "PATCH /network-interfaces/{iface_id}"),
    RouterCase(.running, "PUT", "/network-interfaces/eth0", eth0, 400, "after starting"),

    // vsock, logger, metrics.
    RouterCase(.notStarted, "PUT", "/vsock", vsock, 204),
    RouterCase(.notStarted, "PUT", "/vsock", #"{"guest_cid": 2, "uds_path": "/tmp/v.sock"}"#, 400, "guest_cid"),
    RouterCase(.notStarted, "PUT", "/vsock", #"{"guest_cid": -1, "uds_path": "/tmp/v.sock"}"#, 400, "guest_cid"),
    RouterCase(.notStarted, "PUT", "/vsock", #"{"guest_cid": 4294967296, "uds_path": "/tmp/v.sock"}"#, 400, "`guest_cid` must be an integer"),
    RouterCase(.notStarted, "PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 1e30}"#, 400, "`mem_size_mib` must be an integer"),
    RouterCase(.notStarted, "PUT", "/vsock", #"{"guest_cid": 3}"#, 400, "uds_path"),
    RouterCase(.running, "PUT", "/vsock", vsock, 400, "after starting"),
    RouterCase(.notStarted, "PUT", "/logger", logger, 204),
    RouterCase(.notStarted, "PUT", "/logger", #"{"log_path": "/tmp/fc.log", "level": "Loud"}"#, 400, "level"),
    RouterCase(.running, "PUT", "/logger", logger, 400, "after starting"),
    RouterCase(.notStarted, "PUT", "/metrics", metrics, 204),
    RouterCase(.notStarted, "PUT", "/metrics", "{}", 400, "metrics_path"),
    RouterCase(.running, "PUT", "/metrics", metrics, 400, "after starting"),

    // balloon.
    RouterCase(.notStarted, "PUT", "/balloon", balloon, 204),
    RouterCase(.notStarted, "PUT", "/balloon", #"{"amount_mib": 64}"#, 400, "missing required field `deflate_on_oom`"),
    RouterCase(.notStarted, "PUT", "/balloon", #"{"amount_mib": 128, "deflate_on_oom": false}"#, 400, "less than the machine's mem_size_mib"),
    RouterCase(.notStarted, "PUT", "/balloon", #"{"amount_mib": -1, "deflate_on_oom": false}"#, 400, "amount_mib"),
    RouterCase(.notStarted, "PUT", "/balloon", #"{"amount_mib": 1, "deflate_on_oom": false, "stats_polling_interval_s": 90000}"#, 400, "stats_polling_interval_s"),
    RouterCase(.notStarted, "PUT", "/balloon", #"{"amount_mib": 1, "deflate_on_oom": false, "must_tell_host": true}"#, 400, "unknown field `must_tell_host`"),
    RouterCase(.running, "PUT", "/balloon", balloon, 400, "after starting", configuration: withBalloon),
    RouterCase(.notStarted, "GET", "/balloon", nil, 400, "no balloon device is configured"),
    RouterCase(.running, "GET", "/balloon", nil, 200, configuration: withBalloon),
    RouterCase(.notStarted, "PATCH", "/balloon", #"{"amount_mib": 32}"#, 204, configuration: withBalloon),
    RouterCase(.running, "PATCH", "/balloon", #"{"amount_mib": 32}"#, 204, configuration: withBalloon),
    RouterCase(.running, "PATCH", "/balloon", #"{"amount_mib": 256}"#, 400, "less than the machine's mem_size_mib", configuration: withBalloon),
    RouterCase(.running, "PATCH", "/balloon", #"{"amount_mib": 32}"#, 400, "no balloon device is configured"),
    RouterCase(.running, "PATCH", "/balloon", #"{"amount_mib": 32, "deflate_on_oom": true}"#, 400, "unknown field `deflate_on_oom`", configuration: withBalloon),
    RouterCase(.running, "GET", "/balloon/statistics", nil, 200, configuration: withBalloon),
    RouterCase(.notStarted, "GET", "/balloon/statistics", nil, 400, "before starting", configuration: withBalloon),
    RouterCase(.running, "GET", "/balloon/statistics", nil, 400, "statistics are not enabled", configuration: withQuietBalloon),
    RouterCase(.running, "PATCH", "/balloon/statistics", #"{"stats_polling_interval_s": 5}"#, 204, configuration: withBalloon),
    RouterCase(.running, "PATCH", "/balloon/statistics", #"{"stats_polling_interval_s": 0}"#, 400, "cannot be turned on or off", configuration: withBalloon),
    RouterCase(.running, "PATCH", "/balloon/statistics", #"{"stats_polling_interval_s": 5}"#, 400, "cannot be turned on or off", configuration: withQuietBalloon),
    RouterCase(.notStarted, "PATCH", "/balloon/statistics", #"{"stats_polling_interval_s": 0}"#, 204, configuration: withBalloon),
    RouterCase(.running, "DELETE", "/balloon", nil, 400, "/balloon supports GET, PUT, PATCH", configuration: withBalloon),

    // actions.
    RouterCase(.notStarted, "PUT", "/actions", #"{"action_type": "InstanceStart"}"#, 400, "PUT /boot-source first"),
    RouterCase(.running, "PUT", "/actions", #"{"action_type": "InstanceStart"}"#, 400, "already running"),
    RouterCase(.notStarted, "PUT", "/actions", #"{"action_type": "Reboot"}"#, 400, "unknown action_type `Reboot`"),
    RouterCase(.notStarted, "PUT", "/actions", #"{"action": "InstanceStart"}"#, 400, "unknown field `action`"),
    RouterCase(.notStarted, "PUT", "/actions", "{}", 400, "missing required field `action_type`"),
    RouterCase(.notStarted, "PUT", "/actions", #"{"action_type": 1}"#, 400, "`action_type` must be a string"),
    RouterCase(.notStarted, "PUT", "/actions", #"{"action_type": "SendCtrlAltDel"}"#, 400, "not supported before starting the microVM"),
    RouterCase(.running, "PUT", "/actions", #"{"action_type": "SendCtrlAltDel"}"#, 204),
    RouterCase(.paused, "PUT", "/actions", #"{"action_type": "SendCtrlAltDel"}"#, 400, "paused"),
    RouterCase(.notStarted, "PUT", "/actions", #"{"action_type": "FlushMetrics"}"#, 400, "no metrics file is configured"),

    // vm state.
    RouterCase(.notStarted, "PATCH", "/vm", #"{"state": "Paused"}"#, 400, "not supported before starting the microVM"),
    RouterCase(.running, "PATCH", "/vm", #"{"state": "Paused"}"#, 204),
    RouterCase(.paused, "PATCH", "/vm", #"{"state": "Paused"}"#, 400, "already paused"),
    RouterCase(.paused, "PATCH", "/vm", #"{"state": "Resumed"}"#, 204),
    RouterCase(.running, "PATCH", "/vm", #"{"state": "Resumed"}"#, 400, "not paused"),
    RouterCase(.running, "PATCH", "/vm", #"{"state": "Stopped"}"#, 400, "`state`"),
    RouterCase(.running, "PATCH", "/vm", #"{}"#, 400, "missing required field `state`"),

    // Unknown paths and methods: 400 naming them, as Firecracker answers.
    RouterCase(.notStarted, "GET", "/nope", nil, 400, "Invalid request method and/or path: GET /nope"),
    RouterCase(.notStarted, "PUT", "/snapshot/create", "{}", 400, "Supported: GET /"),
    RouterCase(.notStarted, "PUT", "/vm", #"{"state": "Paused"}"#, 400, "/vm supports PATCH"),
    RouterCase(.notStarted, "DELETE", "/vsock", nil, 400, "/vsock supports PUT"),
    RouterCase(.notStarted, "POST", "/actions", #"{"action_type": "InstanceStart"}"#, 400, "/actions supports PUT"),
    RouterCase(.notStarted, "PUT", "/version", "{}", 400, "/version supports GET"),
    RouterCase(.notStarted, "PUT", "/metrics/x", metrics, 400, "Invalid request method and/or path"),
]

struct APIRouterTests {
    func router(_ phase: InstanceState = .notStarted, configuration: VMConfiguration? = nil) -> (APIRouter, FakeController) {
        let fake = FakeController(state: phase)
        return (APIRouter(controller: fake, instanceID: "vm-7", vmmVersion: "0.1.0", configuration: configuration ?? VMConfiguration()), fake)
    }

    @Test(arguments: routerCases)
    func answers(_ c: RouterCase) {
        let (r, _) = router(c.phase, configuration: c.configuration)
        let response = r.handle(.make(c.method, c.path, c.body))
        #expect(response.status == c.status, "\(response.bodyText)")
        if c.status == 204 { #expect(response.body.isEmpty) }
        if c.status == 200 { #expect(!response.body.isEmpty) }
        if let fault = c.fault {
            let message = response.faultMessage ?? ""
            #expect(message.contains(fault), "fault_message: \(message)")
        }
    }

    @Test func everyRouteSucceedsSomewhereInTheTable() {
        func fits(_ template: String, _ path: String) -> Bool {
            let t = template.split(separator: "/"), p = path.split(separator: "?")[0].split(separator: "/")
            return t.count == p.count && zip(t, p).allSatisfy { $0.hasPrefix("{") || $0 == $1 }
        }
        let uncovered = APIRouter.routes.filter { route in
            !routerCases.contains { $0.status < 300 && $0.method == route.method && fits(route.path, $0.path) }
        }
        #expect(uncovered.isEmpty)
        #expect(APIRouter.routes.count == 20)
    }

    /// A running machine's balloon: the new target reaches the VMM and `GET /balloon` shows it;
    /// the statistics are the VMM's, flat as Firecracker answers them.
    @Test func balloonChangesReachTheVMM() throws {
        let (r, fake) = router(.running, configuration: withBalloon)
        #expect(r.handle(.make("PATCH", "/balloon", #"{"amount_mib": 100}"#)).status == 204)
        #expect(fake.calls == ["setBalloon 100"])
        let shown = try Balloon(json: JSONFields(parsing: r.handle(.make("GET", "/balloon")).body))
        #expect(shown.amountMib == 100 && shown.deflateOnOom && shown.freePageReporting == true)
        let stats = try #require(try JSONSerialization.jsonObject(with: Data(r.handle(.make("GET", "/balloon/statistics")).body)) as? [String: Any])
        #expect(stats["target_pages"] as? Int == 256 && stats["actual_mib"] as? Int == 0 && stats["free_memory"] as? Int == 1 << 20)
        fake.failure.withLock { $0 = "the guest is gone" }
        let failed = r.handle(.make("PATCH", "/balloon", #"{"amount_mib": 10}"#))
        #expect(failed.status == 400 && failed.faultMessage == "the guest is gone")
        #expect(r.configuration.balloon?.amountMib == 100, "a refused change is not recorded")
    }

    @Test func describesTheInstance() throws {
        let (r, fake) = router()
        let before = try JSONSerialization.jsonObject(with: Data(r.handle(.make("GET", "/")).body)) as? [String: String]
        #expect(before == ["id": "vm-7", "state": "Not started", "vmm_version": "0.1.0", "app_name": "mvm-vmm"])
        #expect(r.handle(.make("PUT", "/boot-source", kernel)).status == 204)
        #expect(r.handle(.make("PUT", "/actions", #"{"action_type": "InstanceStart"}"#)).status == 204)
        #expect(fake.state == .running)
        #expect(r.handle(.make("GET", "/")).bodyText.contains(#""state":"Running""#))
        #expect(r.handle(.make("PATCH", "/vm", #"{"state": "Paused"}"#)).status == 204)
        #expect(r.handle(.make("GET", "/")).bodyText.contains(#""state":"Paused""#))
        let version = r.handle(.make("GET", "/version"))
        #expect(version.bodyText == #"{"firecracker_version":"1.7.0"}"#)
        #expect(version.headers.contains(HTTPHeader("Content-Type", "application/json")))
    }

    @Test func patchChangesOnlyTheGivenFields() throws {
        let (r, _) = router()
        #expect(r.handle(.make("PUT", "/machine-config", #"{"vcpu_count": 4, "mem_size_mib": 512, "track_dirty_pages": true}"#)).status == 204)
        #expect(r.handle(.make("PATCH", "/machine-config", #"{"mem_size_mib": 1024}"#)).status == 204)
        #expect(r.configuration.machineConfig == MachineConfig(vcpuCount: 4, memSizeMib: 1024, trackDirtyPages: true))
        #expect(r.handle(.make("PATCH", "/machine-config", #"{"huge_pages": "2M", "smt": true}"#)).status == 204)
        #expect(r.configuration.machineConfig == MachineConfig(vcpuCount: 4, memSizeMib: 1024, smt: true, trackDirtyPages: true, hugePages: "2M"))
        // A rejected patch changes nothing, not even its valid fields.
        #expect(r.handle(.make("PATCH", "/machine-config", #"{"mem_size_mib": 2048, "vcpu_count": 99}"#)).status == 400)
        #expect(r.configuration.machineConfig.memSizeMib == 1024)
        let shown = try MachineConfig(json: JSONFields(parsing: r.handle(.make("GET", "/machine-config")).body))
        #expect(shown == MachineConfig(vcpuCount: 4, memSizeMib: 1024, smt: true, trackDirtyPages: true, hugePages: "2M"))
    }

    /// After boot a controller with CPU hotplug (the hosted one) takes a new vCPU count, and the
    /// configuration shows it; a refusal leaves the count as it was.
    @Test func aRunningMachineWithHotplugTakesANewVCPUCount() throws {
        let fake = FakeController(state: .notStarted)
        let r = APIRouter(controller: fake, vmmVersion: "0")
        #expect(r.handle(.make("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 256}"#)).status == 204)
        try fake.start(r.configuration)
        fake.cpuHotplug.withLock { $0 = true }
        #expect(r.handle(.make("PATCH", "/machine-config", #"{"vcpu_count": 2}"#)).status == 204)
        #expect(fake.calls.last == "setVCPUs 2")
        #expect(r.configuration.machineConfig.vcpuCount == 2)
        fake.failure.withLock { $0 = "3 vCPUs is more than the 2 the VM has room for" }
        let refused = r.handle(.make("PATCH", "/machine-config", #"{"vcpu_count": 3}"#))
        #expect(refused.status == 400 && refused.bodyText.contains("room for"))
        #expect(r.configuration.machineConfig.vcpuCount == 2)
    }

    @Test func putReplacesTheWholeMachineConfig() {
        let (r, _) = router()
        #expect(r.handle(.make("PUT", "/machine-config", #"{"vcpu_count": 4, "mem_size_mib": 512, "smt": true}"#)).status == 204)
        #expect(r.handle(.make("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 128}"#)).status == 204)
        #expect(r.configuration.machineConfig == MachineConfig(vcpuCount: 1, memSizeMib: 128))
        // GET spells Firecracker's defaults out.
        #expect(r.handle(.make("GET", "/machine-config")).bodyText
            == #"{"huge_pages":"None","mem_size_mib":128,"smt":false,"track_dirty_pages":false,"vcpu_count":1}"#)
    }

    @Test func vmConfigReflectsEveryPut() throws {
        let (r, _) = router()
        for (path, body) in [("/machine-config", machine), ("/boot-source", kernel), ("/drives/data", #"{"drive_id": "data", "path_on_host": "/i/data.img", "is_root_device": false}"#),
                             ("/drives/rootfs", rootfs), ("/network-interfaces/eth0", eth0), ("/vsock", vsock), ("/logger", logger), ("/metrics", metrics)] {
            #expect(r.handle(.make("PUT", path, body)).status == 204, "\(path)")
        }
        let response = r.handle(.make("GET", "/vm/config"))
        let shown = try VMConfiguration(parsing: response.body)
        #expect(shown.machineConfig == MachineConfig(vcpuCount: 2, memSizeMib: 256).withDefaults)
        #expect(shown.bootSource == BootSource(kernelImagePath: "/k/vmlinux", bootArgs: "console=ttyS0"))
        // The root device comes first whatever the order of the PUTs.
        #expect(shown.drives.map(\.driveId) == ["rootfs", "data"])
        #expect(shown.networkInterfaces == [NetworkInterface(ifaceId: "eth0", hostDevName: "tap0", guestMac: "06:00:AC:10:00:02")])
        #expect(shown.vsock == Vsock(guestCid: 3, udsPath: "/tmp/v.sock"))
        #expect(shown.logger == Logger(logPath: "/tmp/fc.log", level: "debug", showLevel: true))
        #expect(shown.metrics == Metrics(metricsPath: "/tmp/fc.metrics"))
        let keys = try #require(try JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any]).keys
        #expect(Set(keys) == ["machine-config", "boot-source", "drives", "network-interfaces", "vsock", "logger", "metrics"])
    }

    @Test func drivesAreReplacedByIDWithOneRoot() {
        let (r, _) = router()
        #expect(r.handle(.make("PUT", "/drives/rootfs", rootfs)).status == 204)
        #expect(r.handle(.make("PUT", "/drives/rootfs", #"{"drive_id": "rootfs", "path_on_host": "/i/other.ext4", "is_root_device": true}"#)).status == 204)
        #expect(r.configuration.drives.map(\.pathOnHost) == ["/i/other.ext4"])
        let second = r.handle(.make("PUT", "/drives/alt", #"{"drive_id": "alt", "path_on_host": "/i/alt.ext4", "is_root_device": true}"#))
        #expect(second.status == 400)
        #expect(second.faultMessage?.contains("`rootfs` is already the root device") == true)
        // The root may move to another drive once the old one stops being root.
        #expect(r.handle(.make("PUT", "/drives/rootfs", #"{"drive_id": "rootfs", "path_on_host": "/i/other.ext4", "is_root_device": false}"#)).status == 204)
        #expect(r.handle(.make("PUT", "/drives/alt", #"{"drive_id": "alt", "path_on_host": "/i/alt.ext4", "is_root_device": true}"#)).status == 204)
        #expect(r.configuration.drives.map(\.driveId) == ["alt", "rootfs"])
    }

    @Test func networkInterfacesDoNotShareTapsOrMACs() {
        let (r, _) = router()
        #expect(r.handle(.make("PUT", "/network-interfaces/eth0", eth0)).status == 204)
        let sameTap = r.handle(.make("PUT", "/network-interfaces/eth1", #"{"iface_id": "eth1", "host_dev_name": "tap0"}"#))
        #expect(sameTap.status == 400 && sameTap.faultMessage?.contains("tap0") == true)
        let sameMAC = r.handle(.make("PUT", "/network-interfaces/eth1", #"{"iface_id": "eth1", "host_dev_name": "tap1", "guest_mac": "06:00:ac:10:00:02"}"#))
        #expect(sameMAC.status == 400 && sameMAC.faultMessage?.contains("guest_mac") == true)
        #expect(r.handle(.make("PUT", "/network-interfaces/eth0", #"{"iface_id": "eth0", "host_dev_name": "tap9"}"#)).status == 204)
        #expect(r.configuration.networkInterfaces.map(\.hostDevName) == ["tap9"])
    }

    @Test func instanceStartHandsTheConfigurationToTheController() {
        let (r, fake) = router()
        #expect(r.handle(.make("PUT", "/machine-config", machine)).status == 204)
        #expect(r.handle(.make("PUT", "/boot-source", kernel)).status == 204)
        #expect(r.handle(.make("PUT", "/drives/rootfs", rootfs)).status == 204)
        #expect(r.handle(.make("PUT", "/actions", #"{"action_type": "InstanceStart"}"#)).status == 204)
        #expect(fake.calls == ["start"])
        #expect(fake.startedWith == r.configuration)
        #expect(fake.startedWith?.machineConfig.vcpuCount == 2 && fake.startedWith?.drives.count == 1)
    }

    @Test func controllerErrorsBecomeFaultMessages() {
        let (r, fake) = router()
        #expect(r.handle(.make("PUT", "/boot-source", kernel)).status == 204)
        fake.failure.withLock { $0 = "cannot open /k/vmlinux: No such file or directory" }
        let response = r.handle(.make("PUT", "/actions", #"{"action_type": "InstanceStart"}"#))
        #expect(response.status == 400)
        #expect(response.faultMessage == "cannot open /k/vmlinux: No such file or directory")
        #expect(fake.state == .notStarted)
        // The configuration is still there to fix and retry.
        #expect(r.handle(.make("PUT", "/actions", #"{"action_type": "InstanceStart"}"#)).status == 204)
        #expect(fake.calls == ["start", "start"])
    }

    @Test func flushMetricsAppendsToTheMetricsFile() throws {
        let (r, _) = router()
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("mvm-metrics-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        #expect(r.handle(.make("PUT", "/metrics", #"{"metrics_path": "\#(path)"}"#)).status == 204)
        #expect(r.handle(.make("PUT", "/actions", #"{"action_type": "FlushMetrics"}"#)).status == 204)
        #expect(r.handle(.make("PUT", "/actions", #"{"action_type": "FlushMetrics"}"#)).status == 204)
        #expect(try String(contentsOfFile: path, encoding: .utf8) == "mvm_vcpu_exits_total 42\nmvm_vcpu_exits_total 42\n")

        let unwritable = r
        #expect(unwritable.handle(.make("PUT", "/metrics", #"{"metrics_path": "/nonexistent-dir/m"}"#)).status == 204)
        let failed = unwritable.handle(.make("PUT", "/actions", #"{"action_type": "FlushMetrics"}"#))
        #expect(failed.status == 400 && failed.faultMessage?.contains("/nonexistent-dir/m") == true)
    }

    @Test func metricsAreServedAsPrometheusText() {
        let (r, _) = router()
        let response = r.handle(.make("GET", "/metrics"))
        #expect(response.status == 200)
        #expect(response.bodyText == "mvm_vcpu_exits_total 42\n")
        #expect(response.headers.contains(HTTPHeader("Content-Type", "text/plain; version=0.0.4")))
    }

    @Test func rejectedPutsLeaveTheConfigurationAlone() {
        let (r, _) = router()
        let before = r.configuration
        for c in routerCases where c.phase == .notStarted && c.status == 400 && c.method != "GET" {
            _ = r.handle(.make(c.method, c.path, c.body))
        }
        #expect(r.configuration == before)
    }
}
