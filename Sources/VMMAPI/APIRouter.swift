import FoundationEssentials
import Glibc
import Synchronization
import MicroVMCore

/// One (method, path template) the API serves, e.g. `PUT /drives/{drive_id}`.
public struct APIRoute: Sendable, Hashable, CustomStringConvertible {
    public var method: String
    public var path: String
    public init(_ method: String, _ path: String) { self.method = method; self.path = path }
    public var description: String { "\(method) \(path)" }
}

/// Firecracker's control API over the configuration this router owns and the VMM it drives:
/// `handle` maps a request to a response and touches no socket. Requests are handled one at
/// a time (Firecracker's API is single-threaded too); the configuration sits behind a Mutex
/// so `configuration` may be read from any thread.
public final class APIRouter: Sendable {
    /// The Firecracker API version this API is compatible with (`GET /version`).
    public static let compatibleFirecrackerVersion = "1.7.0"
    /// `GET /`'s `app_name`.
    public static let appName = "mvm-vmm"

    /// Everything served, in the order of Firecracker's document (`GET /metrics` is this VMM's own).
    public static let routes: [APIRoute] = table.map(\.route)

    public let controller: any VMMController
    public let instanceID: String
    public let vmmVersion: String
    private let config: Mutex<VMConfiguration>

    public init(controller: any VMMController, instanceID: String = "anonymous-instance", vmmVersion: String,
                configuration: VMConfiguration = VMConfiguration()) {
        self.controller = controller; self.instanceID = instanceID; self.vmmVersion = vmmVersion
        self.config = Mutex(configuration)
    }

    /// The configuration as PUT so far (what `InstanceStart` hands to the controller).
    public var configuration: VMConfiguration { config.withLock { $0 } }

    public func handle(_ request: HTTPRequest) -> HTTPResponse {
        config.withLock { cfg in
            do throws(APIFault) {
                return try dispatch(request, &cfg)
            } catch {
                return .fault(error.status, error.message)
            }
        }
    }

    // MARK: Routing

    private enum Endpoint {
        case describeInstance, version, getMachineConfig, putMachineConfig, patchMachineConfig, putBootSource
        case putDrive, putNetworkInterface, putVsock, putLogger, putMetrics, getMetrics, actions, patchVM, getVMConfig
        case putBalloon, getBalloon, patchBalloon, getBalloonStatistics, patchBalloonStatistics
    }

    private static let table: [(route: APIRoute, endpoint: Endpoint)] = [
        (APIRoute("GET", "/"), .describeInstance),
        (APIRoute("PUT", "/actions"), .actions),
        (APIRoute("GET", "/balloon"), .getBalloon),
        (APIRoute("PUT", "/balloon"), .putBalloon),
        (APIRoute("PATCH", "/balloon"), .patchBalloon),
        (APIRoute("GET", "/balloon/statistics"), .getBalloonStatistics),
        (APIRoute("PATCH", "/balloon/statistics"), .patchBalloonStatistics),
        (APIRoute("PUT", "/boot-source"), .putBootSource),
        (APIRoute("PUT", "/drives/{drive_id}"), .putDrive),
        (APIRoute("PUT", "/logger"), .putLogger),
        (APIRoute("GET", "/machine-config"), .getMachineConfig),
        (APIRoute("PUT", "/machine-config"), .putMachineConfig),
        (APIRoute("PATCH", "/machine-config"), .patchMachineConfig),
        (APIRoute("GET", "/metrics"), .getMetrics),
        (APIRoute("PUT", "/metrics"), .putMetrics),
        (APIRoute("PUT", "/network-interfaces/{iface_id}"), .putNetworkInterface),
        (APIRoute("GET", "/version"), .version),
        (APIRoute("PATCH", "/vm"), .patchVM),
        (APIRoute("GET", "/vm/config"), .getVMConfig),
        (APIRoute("PUT", "/vsock"), .putVsock),
    ]

    /// The path's segments (a trailing slash is ignored, as Firecracker ignores it).
    private static func segments(_ path: String) -> [Substring] {
        var parts = path.split(separator: "/", omittingEmptySubsequences: false)
        if parts.first == "" { parts.removeFirst() }
        if parts.count > 1, parts.last == "" { parts.removeLast() }
        return parts
    }

    /// Whether `path` fits `template`, and the value of its `{…}` segment if it has one.
    private static func match(_ template: String, _ path: [Substring]) -> (matches: Bool, parameter: String?) {
        let t = segments(template)
        guard t.count == path.count else { return (false, nil) }
        var parameter: String?
        for (a, b) in zip(t, path) {
            if a.hasPrefix("{") { parameter = String(b) } else if a != b { return (false, nil) }
        }
        return (true, parameter)
    }

    private func dispatch(_ request: HTTPRequest, _ cfg: inout VMConfiguration) throws(APIFault) -> HTTPResponse {
        let path = request.path
        let parts = Self.segments(path)
        var allowedHere: [String] = []
        var template = ""
        for (route, endpoint) in Self.table {
            let (matches, parameter) = Self.match(route.path, parts)
            guard matches else { continue }
            template = route.path
            guard route.method == request.method else { allowedHere.append(route.method); continue }
            return try serve(endpoint, parameter ?? "", request, &cfg)
        }
        let asked = "Invalid request method and/or path: \(request.method) \(path)."
        if (template == "/drives/{drive_id}" || template == "/network-interfaces/{iface_id}") && request.method == "PATCH" {
            throw APIFault("\(asked) Updating a device after boot (Firecracker's PATCH \(template)) is not supported by this VMM;"
                + " \(template) supports PUT, before InstanceStart.")
        }
        if !allowedHere.isEmpty {
            throw APIFault("\(asked) \(template) supports \(allowedHere.joined(separator: ", ")).")
        }
        throw APIFault("\(asked) Supported: \(Self.routes.map(\.description).joined(separator: ", ")).")
    }

    private func serve(_ endpoint: Endpoint, _ id: String, _ request: HTTPRequest, _ cfg: inout VMConfiguration) throws(APIFault) -> HTTPResponse {
        let what = "\(request.method) \(request.path)"
        switch endpoint {
        case .describeInstance:
            return .json(InstanceInfo(id: instanceID, state: controller.state.rawValue, vmmVersion: vmmVersion, appName: Self.appName))
        case .version:
            return .json(["firecracker_version": Self.compatibleFirecrackerVersion])
        case .getMachineConfig:
            return .json(cfg.machineConfig.withDefaults)
        case .getVMConfig:
            var shown = cfg
            shown.machineConfig = shown.machineConfig.withDefaults
            return .json(shown)
        case .getMetrics:
            return .text(controller.metricsText(), contentType: "text/plain; version=0.0.4")

        case .putMachineConfig:
            try preBoot(what)
            let m = try JSONBody.read(MachineConfig.self, request)
            try Self.validate(m)
            cfg.machineConfig = m
        case .patchMachineConfig:
            let patch = try JSONBody.read(MachineConfigFields.self, request)
            guard patch.changesSomething else { throw APIFault("\(what): the body names no field to change") }
            if controller.state != .notStarted {
                // After boot only the vCPU count may move, where the machine can plug CPUs.
                guard let count = patch.vcpuCount, patch.memSizeMib == nil, patch.smt == nil, patch.trackDirtyPages == nil, patch.hugePages == nil else {
                    throw APIFault("\(what) after InstanceStart changes vcpu_count only (memory moves through PATCH /balloon). \(Self.notAfterStart)")
                }
                try controlling { try controller.setVCPUs(count) }
                cfg.machineConfig.vcpuCount = count
                return .noContent
            }
            let m = patch.applied(to: cfg.machineConfig)
            try Self.validate(m)
            cfg.machineConfig = m
        case .putBootSource:
            try preBoot(what)
            let b = try JSONBody.read(BootSource.self, request)
            guard !b.kernelImagePath.isEmpty else { throw APIFault("kernel_image_path must not be empty") }
            cfg.bootSource = b
        case .putDrive:
            try preBoot(what)
            try Self.checkID(id, "drive_id")
            let d = try JSONBody.read(Drive.self, request)
            try Self.validate(d, pathID: id, among: cfg.drives)
            if let i = cfg.drives.firstIndex(where: { $0.driveId == d.driveId }) { cfg.drives[i] = d } else { cfg.drives.append(d) }
            cfg.drives = cfg.drivesRootFirst
        case .putNetworkInterface:
            try preBoot(what)
            try Self.checkID(id, "iface_id")
            let n = try JSONBody.read(NetworkInterface.self, request)
            try Self.validate(n, pathID: id, among: cfg.networkInterfaces)
            if let i = cfg.networkInterfaces.firstIndex(where: { $0.ifaceId == n.ifaceId }) {
                cfg.networkInterfaces[i] = n
            } else {
                cfg.networkInterfaces.append(n)
            }
        case .putVsock:
            try preBoot(what)
            let v = try JSONBody.read(Vsock.self, request)
            if let problem = v.problem { throw APIFault(problem) }
            cfg.vsock = v
        case .putLogger:
            try preBoot(what)
            let l = try JSONBody.read(Logger.self, request)
            guard !l.logPath.isEmpty else { throw APIFault("log_path must not be empty") }
            let levels = ["Error", "Warning", "Info", "Debug", "Trace", "Off"]
            if let level = l.level, !levels.contains(where: { $0.lowercased() == level.lowercased() }) {
                throw APIFault("level must be one of \(levels.joined(separator: ", ")) (got \"\(level)\")")
            }
            cfg.logger = l
        case .putMetrics:
            try preBoot(what)
            let m = try JSONBody.read(Metrics.self, request)
            guard !m.metricsPath.isEmpty else { throw APIFault("metrics_path must not be empty") }
            cfg.metrics = m

        case .putBalloon:
            try preBoot(what)
            let b = try JSONBody.read(Balloon.self, request)
            if let problem = b.problem(memSizeMib: cfg.machineConfig.memSizeMib) { throw APIFault(problem) }
            cfg.balloon = b
        case .getBalloon:
            guard let b = cfg.balloon else { throw APIFault("\(what): no balloon device is configured; PUT /balloon before InstanceStart") }
            return .json(b)
        case .patchBalloon:
            guard var b = cfg.balloon else { throw APIFault("\(what): no balloon device is configured; PUT /balloon before InstanceStart") }
            let patch = try JSONBody.read(BalloonUpdate.self, request)
            b.amountMib = patch.amountMib
            if let problem = b.problem(memSizeMib: cfg.machineConfig.memSizeMib) { throw APIFault(problem) }
            if controller.state != .notStarted { try controlling { try controller.setBalloon(amountMib: patch.amountMib) } }
            cfg.balloon = b
        case .getBalloonStatistics:
            guard let b = cfg.balloon, (b.statsPollingIntervalS ?? 0) > 0 else {
                throw APIFault("\(what): balloon statistics are not enabled; PUT /balloon with stats_polling_interval_s > 0 before InstanceStart")
            }
            guard controller.state != .notStarted else { throw APIFault("\(what): \(Self.notBeforeStart)") }
            var stats: BalloonStatistics?
            try controlling { stats = try controller.balloonStatistics() }
            return .json(stats)
        case .patchBalloonStatistics:
            guard var b = cfg.balloon else { throw APIFault("\(what): no balloon device is configured; PUT /balloon before InstanceStart") }
            let patch = try JSONBody.read(BalloonStatisticsUpdate.self, request)
            if controller.state == .notStarted {
                b.statsPollingIntervalS = patch.statsPollingIntervalS
            } else {
                guard (b.statsPollingIntervalS ?? 0) > 0, patch.statsPollingIntervalS > 0 else {
                    throw APIFault("\(what): statistics cannot be turned on or off after InstanceStart, only their interval changed")
                }
                try controlling { try controller.setBalloonStatisticsInterval(patch.statsPollingIntervalS) }
                b.statsPollingIntervalS = patch.statsPollingIntervalS
            }
            cfg.balloon = b

        case .actions:
            let action = try JSONBody.read(InstanceAction.self, request)
            try perform(action.actionType, cfg)
        case .patchVM:
            let change = try JSONBody.read(VMStateChange.self, request)
            try changeState(to: change.state)
        }
        return .noContent
    }

    // MARK: State

    private static let notAfterStart = "The requested operation is not supported after starting the microVM."
    private static let notBeforeStart = "The requested operation is not supported before starting the microVM."

    private func preBoot(_ what: String) throws(APIFault) {
        guard controller.state == .notStarted else { throw APIFault("\(what) is accepted only before InstanceStart. \(Self.notAfterStart)") }
    }

    private func perform(_ action: String, _ cfg: VMConfiguration) throws(APIFault) {
        switch action {
        case "InstanceStart":
            guard controller.state == .notStarted else {
                throw APIFault("InstanceStart: the microVM is already \(controller.state.rawValue.lowercased()). \(Self.notAfterStart)")
            }
            guard cfg.bootSource != nil else {
                throw APIFault("InstanceStart: cannot start the microVM without a kernel; PUT /boot-source first")
            }
            try controlling { try controller.start(cfg) }
        case "SendCtrlAltDel":
            switch controller.state {
            case .running: try controlling { try controller.sendCtrlAltDel() }
            case .notStarted: throw APIFault("SendCtrlAltDel: \(Self.notBeforeStart)")
            case .paused: throw APIFault("SendCtrlAltDel needs a running microVM; it is paused (PATCH /vm {\"state\": \"Resumed\"} first)")
            }
        case "FlushMetrics":
            guard let path = cfg.metrics?.metricsPath else {
                throw APIFault("FlushMetrics: no metrics file is configured; PUT /metrics first")
            }
            try Self.append(controller.metricsText(), to: path)
        default:
            throw APIFault("unknown action_type `\(action)`, expected one of: `InstanceStart`, `SendCtrlAltDel`, `FlushMetrics`")
        }
    }

    private func changeState(to state: String) throws(APIFault) {
        let current = controller.state
        switch state {
        case "Paused":
            switch current {
            case .running: try controlling { try controller.pause() }
            case .paused: throw APIFault("the microVM is already paused")
            case .notStarted: throw APIFault("PATCH /vm: \(Self.notBeforeStart)")
            }
        case "Resumed":
            switch current {
            case .paused: try controlling { try controller.resume() }
            case .running: throw APIFault("the microVM is not paused")
            case .notStarted: throw APIFault("PATCH /vm: \(Self.notBeforeStart)")
            }
        default:
            throw APIFault("field `state` must be \"Paused\" or \"Resumed\" (got \"\(state)\")")
        }
    }

    /// Runs a controller call; what it throws becomes the fault message.
    private func controlling(_ body: () throws -> Void) throws(APIFault) {
        do { try body() } catch { throw APIFault(String(describing: error)) }
    }

    /// Appends `text` to the metrics file or named pipe without ever blocking the API
    /// (a pipe nobody reads fails instead of hanging).
    private static func append(_ text: String, to path: String) throws(APIFault) {
        let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_NONBLOCK | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw APIFault("FlushMetrics: cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let bytes = Array(text.utf8)
        var done = 0
        while done < bytes.count {
            let n = bytes[done...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw APIFault("FlushMetrics: cannot write \(path): \(String(cString: strerror(errno)))") }
            done += n
        }
    }

    // MARK: Validation

    /// Firecracker's rule for resource ids: non-empty, ASCII letters, digits and underscores.
    private static func checkID(_ id: String, _ name: String) throws(APIFault) {
        guard !id.isEmpty, id.utf8.count <= 64,
              id.utf8.allSatisfy({ ($0 >= 48 && $0 <= 57) || ($0 >= 65 && $0 <= 90) || ($0 >= 97 && $0 <= 122) || $0 == 95 }) else {
            throw APIFault("\(name) `\(id)` is invalid: API resource ids are 1 to 64 ASCII letters, digits and underscores")
        }
    }

    static func validate(_ m: MachineConfig) throws(APIFault) {
        if let problem = m.problem { throw APIFault(problem) }
    }

    private static func validate(_ d: Drive, pathID: String, among drives: [Drive]) throws(APIFault) {
        guard d.driveId == pathID else {
            throw APIFault("the drive_id in the body (`\(d.driveId)`) does not match the path's (`\(pathID)`)")
        }
        guard !d.pathOnHost.isEmpty else { throw APIFault("path_on_host must not be empty") }
        if let c = d.cacheType, c != "Unsafe", c != "Writeback" {
            throw APIFault("cache_type must be \"Unsafe\" or \"Writeback\" (got \"\(c)\")")
        }
        if let e = d.ioEngine, e != "Sync", e != "Async" {
            throw APIFault("io_engine must be \"Sync\" or \"Async\" (got \"\(e)\")")
        }
        if d.isRootDevice, let root = drives.first(where: { $0.isRootDevice && $0.driveId != d.driveId }) {
            throw APIFault("drive `\(root.driveId)` is already the root device; at most one drive may set is_root_device")
        }
    }

    private static func validate(_ n: NetworkInterface, pathID: String, among interfaces: [NetworkInterface]) throws(APIFault) {
        guard n.ifaceId == pathID else {
            throw APIFault("the iface_id in the body (`\(n.ifaceId)`) does not match the path's (`\(pathID)`)")
        }
        guard !n.hostDevName.isEmpty, n.hostDevName.utf8.count < 16 else {
            throw APIFault("host_dev_name must be a tap device name of 1 to 15 bytes (got \"\(n.hostDevName)\")")
        }
        if let mac = n.guestMac, NetworkInterface.macBytes(mac) == nil {
            throw APIFault("guest_mac must be six hexadecimal pairs separated by colons (got \"\(mac)\")")
        }
        for other in interfaces where other.ifaceId != n.ifaceId {
            if other.hostDevName == n.hostDevName {
                throw APIFault("host_dev_name \(n.hostDevName) is already used by network interface `\(other.ifaceId)`")
            }
            if let mac = n.guestMac, other.guestMac?.lowercased() == mac.lowercased() {
                throw APIFault("guest_mac \(mac) is already used by network interface `\(other.ifaceId)`")
            }
        }
    }
}

// MARK: Bodies

/// `GET /`.
struct InstanceInfo: Codable {
    var id: String
    var state: String
    var vmmVersion: String
    var appName: String
    enum CodingKeys: String, CodingKey { case id, state, vmmVersion = "vmm_version", appName = "app_name" }
}

/// `PATCH /balloon`.
struct BalloonUpdate: JSONReadable {
    var amountMib: Int
    init(json f: JSONFields) throws(JSONFieldError) {
        try f.refuseUnknown(["amount_mib"])
        amountMib = try f.required("amount_mib") { (k) throws(JSONFieldError) in try f.integer(k, in: Balloon.amountRange) }
    }
}

/// `PATCH /balloon/statistics`.
struct BalloonStatisticsUpdate: JSONReadable {
    var statsPollingIntervalS: Int
    init(json f: JSONFields) throws(JSONFieldError) {
        try f.refuseUnknown(["stats_polling_interval_s"])
        statsPollingIntervalS = try f.required("stats_polling_interval_s") { (k) throws(JSONFieldError) in try f.integer(k, in: Balloon.statsIntervalRange) }
    }
}

/// `PUT /actions`.
struct InstanceAction: JSONReadable {
    var actionType: String
    init(json f: JSONFields) throws(JSONFieldError) {
        try f.refuseUnknown(["action_type"])
        actionType = try f.required("action_type", f.string)
    }
}

/// `PATCH /vm`.
struct VMStateChange: JSONReadable {
    var state: String
    init(json f: JSONFields) throws(JSONFieldError) {
        try f.refuseUnknown(["state"])
        state = try f.required("state", f.string)
    }
}

/// `PATCH /machine-config`: only the fields present change.
extension MachineConfigFields {
    var changesSomething: Bool { vcpuCount != nil || memSizeMib != nil || smt != nil || trackDirtyPages != nil || hugePages != nil }

    func applied(to m: MachineConfig) -> MachineConfig {
        var m = m
        if let vcpuCount { m.vcpuCount = vcpuCount }
        if let memSizeMib { m.memSizeMib = memSizeMib }
        if let smt { m.smt = smt }
        if let trackDirtyPages { m.trackDirtyPages = trackDirtyPages }
        if let hugePages { m.hugePages = hugePages }
        return m
    }
}

extension MachineConfig {
    /// The configuration with Firecracker's defaults spelled out (what `GET /machine-config` shows).
    public var withDefaults: MachineConfig {
        MachineConfig(vcpuCount: vcpuCount, memSizeMib: memSizeMib, smt: smt ?? false, trackDirtyPages: trackDirtyPages ?? false,
                      hugePages: hugePages ?? "None")
    }
}
