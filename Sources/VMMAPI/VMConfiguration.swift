import MicroVMCore

/// The micro-VM's configuration in Firecracker's JSON shapes (API version 1.x): the bodies of
/// `PUT /machine-config`, `/boot-source`, `/drives/{id}`, `/network-interfaces/{id}`, `/vsock`,
/// `/logger` and `/metrics`, and together the `--config-file` document and `GET /vm/config`.
/// Field names are Firecracker's, so its clients and SDKs drive `mvm-vmm` unchanged.
public struct VMConfiguration: Encodable, JSONReadable, Sendable, Equatable {
    public var machineConfig: MachineConfig
    public var bootSource: BootSource?
    public var drives: [Drive]
    public var networkInterfaces: [NetworkInterface]
    public var vsock: Vsock?
    public var logger: Logger?
    public var metrics: Metrics?
    public var balloon: Balloon?
    /// vCPU i → the host CPUs its thread may run on (an `mvm` launch plan's placement; not a
    /// Firecracker field, so only config files carry it, under `x-mvm-vcpu-pins`).
    public var vcpuPins: [[Int]]?

    public init(machineConfig: MachineConfig = MachineConfig(), bootSource: BootSource? = nil, drives: [Drive] = [],
                networkInterfaces: [NetworkInterface] = [], vsock: Vsock? = nil, logger: Logger? = nil, metrics: Metrics? = nil,
                balloon: Balloon? = nil) {
        self.machineConfig = machineConfig; self.bootSource = bootSource; self.drives = drives
        self.networkInterfaces = networkInterfaces; self.vsock = vsock; self.logger = logger; self.metrics = metrics
        self.balloon = balloon
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case machineConfig = "machine-config", bootSource = "boot-source", drives
        case networkInterfaces = "network-interfaces", vsock, logger, metrics, balloon, vcpuPins = "x-mvm-vcpu-pins"
    }

    /// The `--config-file` document (or `GET /vm/config`'s answer) in `bytes`.
    public init(parsing bytes: some Collection<UInt8>) throws(JSONFieldError) {
        try self.init(json: JSONFields(parsing: bytes))
    }

    public init(json f: JSONFields) throws(JSONFieldError) {
        try f.refuseUnknown(CodingKeys.names)
        machineConfig = try f.object("machine-config", as: MachineConfig.self) ?? MachineConfig()
        bootSource = try f.object("boot-source", as: BootSource.self)
        drives = try f.objects("drives", as: Drive.self) ?? []
        networkInterfaces = try f.objects("network-interfaces", as: NetworkInterface.self) ?? []
        vsock = try f.object("vsock", as: Vsock.self)
        logger = try f.object("logger", as: Logger.self)
        metrics = try f.object("metrics", as: Metrics.self)
        balloon = try f.object("balloon", as: Balloon.self)
        vcpuPins = try f.array("x-mvm-vcpu-pins") { (pins, path) throws(JSONFieldError) in
            guard case .array(let cpus) = pins else { throw JSONFieldError("field `\(path)` must be an array of CPU numbers") }
            return try cpus.map { (cpu) throws(JSONFieldError) in
                guard case .number(let n) = cpu, let i = Int(exactly: n), (0..<4096).contains(i) else {
                    throw JSONFieldError("field `\(path)` must hold CPU numbers from 0 to 4095")
                }
                return i
            }
        }
    }
}

extension CaseIterable where Self: RawRepresentable, RawValue == String {
    /// The JSON field names, in declaration order.
    static var names: [String] { allCases.map(\.rawValue) }
}

/// `machine-config`'s fields, each optional: a `PATCH /machine-config`, and what `PUT` and a
/// configuration file read before they require the two counts.
struct MachineConfigFields: JSONReadable, Sendable {
    var vcpuCount: Int?
    var memSizeMib: Int?
    var smt: Bool?
    var trackDirtyPages: Bool?
    var hugePages: String?

    /// The counts are bounded wide enough for any sane value and narrow enough to be exact in
    /// a Double; `MachineConfig.problem` narrows them further, in words.
    init(json f: JSONFields) throws(JSONFieldError) {
        try f.refuseUnknown(MachineConfig.jsonKeys)
        vcpuCount = try f.integer("vcpu_count", in: -1_000_000_000_000_000...1_000_000_000_000_000)
        memSizeMib = try f.integer("mem_size_mib", in: -1_000_000_000_000_000...1_000_000_000_000_000)
        smt = try f.bool("smt")
        trackDirtyPages = try f.bool("track_dirty_pages")
        hugePages = try f.string("huge_pages")
    }
}

/// `machine-config`: vCPUs and memory (Firecracker's defaults: 1 vCPU, 128 MiB).
public struct MachineConfig: Encodable, JSONReadable, Sendable, Equatable {
    public var vcpuCount: Int
    public var memSizeMib: Int
    public var smt: Bool?
    public var trackDirtyPages: Bool?
    /// "None" or "2M" (hugetlbfs-backed guest RAM).
    public var hugePages: String?

    public init(vcpuCount: Int = 1, memSizeMib: Int = 128, smt: Bool? = nil, trackDirtyPages: Bool? = nil, hugePages: String? = nil) {
        self.vcpuCount = vcpuCount; self.memSizeMib = memSizeMib; self.smt = smt; self.trackDirtyPages = trackDirtyPages; self.hugePages = hugePages
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case vcpuCount = "vcpu_count", memSizeMib = "mem_size_mib", smt, trackDirtyPages = "track_dirty_pages", hugePages = "huge_pages"
    }

    /// Firecracker's field names for it.
    public static let jsonKeys = CodingKeys.names

    public init(json f: JSONFields) throws(JSONFieldError) {
        let patch = try MachineConfigFields(json: f)
        vcpuCount = try f.required("vcpu_count") { _ in patch.vcpuCount }
        memSizeMib = try f.required("mem_size_mib") { _ in patch.memSizeMib }
        smt = patch.smt; trackDirtyPages = patch.trackDirtyPages; hugePages = patch.hugePages
    }
}

extension MachineConfig {
    /// What is wrong with this machine, or nil: one rule for the API's PUT and PATCH and for a
    /// `--config-file`, checked before anything is allocated.
    public var problem: String? {
        guard (1...32).contains(vcpuCount) else { return "vcpu_count must be between 1 and 32 (got \(vcpuCount))" }
        guard memSizeMib >= 16 else { return "mem_size_mib must be at least 16 (got \(memSizeMib))" }
        // Beyond this the byte count no longer fits the guest's 64-bit address arithmetic comfortably.
        guard memSizeMib <= 1 << 30 else { return "mem_size_mib is too large (got \(memSizeMib))" }
        if smt == true, vcpuCount > 1, vcpuCount % 2 != 0 { return "with smt enabled, vcpu_count must be 1 or even (got \(vcpuCount))" }
        switch hugePages {
        case nil, "None": return nil
        case "2M": return memSizeMib % 2 == 0 ? nil : "with huge_pages \"2M\", mem_size_mib must be a multiple of 2 (got \(memSizeMib))"
        case let other?: return "huge_pages must be \"None\" or \"2M\" (got \"\(other)\")"
        }
    }
}

extension VMConfiguration {
    /// The drives with the root device first, so the guest sees it as /dev/vda (as in Firecracker).
    public var drivesRootFirst: [Drive] { drives.filter(\.isRootDevice) + drives.filter { !$0.isRootDevice } }
}

extension NetworkInterface {
    /// "AA:BB:CC:DD:EE:FF" as six bytes; nil unless it is six hexadecimal pairs separated by colons.
    public static func macBytes(_ text: String) -> [UInt8]? {
        let pairs = text.split(separator: ":", omittingEmptySubsequences: false)
        guard pairs.count == 6, pairs.allSatisfy({ $0.utf8.count == 2 }) else { return nil }
        let bytes = pairs.compactMap { UInt8($0, radix: 16) }
        return bytes.count == 6 ? bytes : nil
    }
}

extension Vsock {
    /// What is wrong with the CID, or nil: 0-2 are the hypervisor, the local loopback and the
    /// host; 0xFFFFFFFF is VMADDR_CID_ANY.
    public var problem: String? {
        guestCid >= 3 && guestCid < UInt32.max ? nil : "guest_cid must be at least 3 and below 4294967295 (got \(guestCid))"
    }
}

/// `boot-source`: the kernel (bzImage or ELF vmlinux), its initrd and command line.
public struct BootSource: Encodable, JSONReadable, Sendable, Equatable {
    public var kernelImagePath: String
    public var initrdPath: String?
    public var bootArgs: String?

    public init(kernelImagePath: String, initrdPath: String? = nil, bootArgs: String? = nil) {
        self.kernelImagePath = kernelImagePath; self.initrdPath = initrdPath; self.bootArgs = bootArgs
    }

    enum CodingKeys: String, CodingKey, CaseIterable { case kernelImagePath = "kernel_image_path", initrdPath = "initrd_path", bootArgs = "boot_args" }

    public init(json f: JSONFields) throws(JSONFieldError) {
        try f.refuseUnknown(CodingKeys.names)
        kernelImagePath = try f.required("kernel_image_path", f.string)
        initrdPath = try f.string("initrd_path")
        bootArgs = try f.string("boot_args")
    }
}

/// `drives/{drive_id}`: a raw disk image over virtio-blk.
public struct Drive: Encodable, JSONReadable, Sendable, Equatable {
    public var driveId: String
    public var pathOnHost: String
    public var isRootDevice: Bool
    public var isReadOnly: Bool?
    public var partuuid: String?
    /// "Unsafe" (the default) or "Writeback".
    public var cacheType: String?
    /// "Sync" (the only engine here) or "Async".
    public var ioEngine: String?

    public init(driveId: String, pathOnHost: String, isRootDevice: Bool = false, isReadOnly: Bool? = nil, partuuid: String? = nil,
                cacheType: String? = nil, ioEngine: String? = nil) {
        self.driveId = driveId; self.pathOnHost = pathOnHost; self.isRootDevice = isRootDevice; self.isReadOnly = isReadOnly
        self.partuuid = partuuid; self.cacheType = cacheType; self.ioEngine = ioEngine
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case driveId = "drive_id", pathOnHost = "path_on_host", isRootDevice = "is_root_device", isReadOnly = "is_read_only"
        case partuuid, cacheType = "cache_type", ioEngine = "io_engine"
    }

    public init(json f: JSONFields) throws(JSONFieldError) {
        try f.refuseUnknown(CodingKeys.names)
        driveId = try f.required("drive_id", f.string)
        pathOnHost = try f.required("path_on_host", f.string)
        isRootDevice = try f.required("is_root_device", f.bool)
        isReadOnly = try f.bool("is_read_only")
        partuuid = try f.string("partuuid")
        cacheType = try f.string("cache_type")
        ioEngine = try f.string("io_engine")
    }
}

/// `network-interfaces/{iface_id}`: an existing tap on the host, over virtio-net.
public struct NetworkInterface: Encodable, JSONReadable, Sendable, Equatable {
    public var ifaceId: String
    public var hostDevName: String
    public var guestMac: String?

    public init(ifaceId: String, hostDevName: String, guestMac: String? = nil) {
        self.ifaceId = ifaceId; self.hostDevName = hostDevName; self.guestMac = guestMac
    }

    enum CodingKeys: String, CodingKey, CaseIterable { case ifaceId = "iface_id", hostDevName = "host_dev_name", guestMac = "guest_mac" }

    public init(json f: JSONFields) throws(JSONFieldError) {
        try f.refuseUnknown(CodingKeys.names)
        ifaceId = try f.required("iface_id", f.string)
        hostDevName = try f.required("host_dev_name", f.string)
        guestMac = try f.string("guest_mac")
    }
}

/// `vsock`: a virtio-vsock device with this CID. Firecracker proxies guest ports to a unix
/// socket at `uds_path`; this VMM uses the kernel's vhost-vsock instead, so host processes
/// reach the guest with AF_VSOCK at `guest_cid`, and `uds_path` is kept only to be reported back.
public struct Vsock: Encodable, JSONReadable, Sendable, Equatable {
    public var guestCid: UInt32
    public var udsPath: String
    public var vsockId: String?

    public init(guestCid: UInt32, udsPath: String, vsockId: String? = nil) { self.guestCid = guestCid; self.udsPath = udsPath; self.vsockId = vsockId }

    enum CodingKeys: String, CodingKey, CaseIterable { case guestCid = "guest_cid", udsPath = "uds_path", vsockId = "vsock_id" }

    public init(json f: JSONFields) throws(JSONFieldError) {
        try f.refuseUnknown(CodingKeys.names)
        guestCid = try f.required("guest_cid") { (k) throws(JSONFieldError) in try f.integer(k, in: 0...UInt32.max) }
        udsPath = try f.required("uds_path", f.string)
        vsockId = try f.string("vsock_id")
    }
}

/// `logger`: where the VMM writes its own log.
public struct Logger: Encodable, JSONReadable, Sendable, Equatable {
    public var logPath: String
    /// "Error", "Warning", "Info", "Debug", "Trace" or "Off".
    public var level: String?
    public var showLevel: Bool?
    public var showLogOrigin: Bool?
    /// Only messages from this module path (Firecracker's `module` filter; firecracker-go-sdk may send it).
    public var module: String?

    public init(logPath: String, level: String? = nil, showLevel: Bool? = nil, showLogOrigin: Bool? = nil, module: String? = nil) {
        self.logPath = logPath; self.level = level; self.showLevel = showLevel; self.showLogOrigin = showLogOrigin; self.module = module
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case logPath = "log_path", level, showLevel = "show_level", showLogOrigin = "show_log_origin", module
    }

    public init(json f: JSONFields) throws(JSONFieldError) {
        try f.refuseUnknown(CodingKeys.names)
        logPath = try f.required("log_path", f.string)
        level = try f.string("level")
        showLevel = try f.bool("show_level")
        showLogOrigin = try f.bool("show_log_origin")
        module = try f.string("module")
    }
}

/// `metrics`: where `FlushMetrics` (and the VMM's periodic flush) writes its counters.
public struct Metrics: Encodable, JSONReadable, Sendable, Equatable {
    public var metricsPath: String
    public init(metricsPath: String) { self.metricsPath = metricsPath }
    enum CodingKeys: String, CodingKey, CaseIterable { case metricsPath = "metrics_path" }

    public init(json f: JSONFields) throws(JSONFieldError) {
        try f.refuseUnknown(CodingKeys.names)
        metricsPath = try f.required("metrics_path", f.string)
    }
}

/// `balloon`: a virtio-balloon device holding `amount_mib` of the guest's memory for the host.
/// `stats_polling_interval_s` 0 turns statistics off (they cannot be turned on after boot);
/// `free_page_reporting` has the guest report the pages it frees, which the host discards.
public struct Balloon: Encodable, JSONReadable, Sendable, Equatable {
    public var amountMib: Int
    public var deflateOnOom: Bool
    public var statsPollingIntervalS: Int?
    public var freePageReporting: Bool?

    public init(amountMib: Int, deflateOnOom: Bool, statsPollingIntervalS: Int? = nil, freePageReporting: Bool? = nil) {
        self.amountMib = amountMib; self.deflateOnOom = deflateOnOom; self.statsPollingIntervalS = statsPollingIntervalS
        self.freePageReporting = freePageReporting
    }

    enum CodingKeys: String, CodingKey, CaseIterable {
        case amountMib = "amount_mib", deflateOnOom = "deflate_on_oom", statsPollingIntervalS = "stats_polling_interval_s"
        case freePageReporting = "free_page_reporting"
    }

    public init(json f: JSONFields) throws(JSONFieldError) {
        try f.refuseUnknown(Self.jsonKeys)
        amountMib = try f.required("amount_mib") { (k) throws(JSONFieldError) in try f.integer(k, in: Self.amountRange) }
        deflateOnOom = try f.required("deflate_on_oom", f.bool)
        statsPollingIntervalS = try f.integer("stats_polling_interval_s", in: Self.statsIntervalRange)
        freePageReporting = try f.bool("free_page_reporting")
    }

    /// What `amount_mib` may be (MiB), and `stats_polling_interval_s` (seconds, a day at most).
    public static let amountRange = 0...(1 << 30)
    public static let statsIntervalRange = 0...86_400
    public static let jsonKeys = CodingKeys.names

    /// What is wrong with it for a machine of `memSizeMib`, or nil.
    public func problem(memSizeMib: Int) -> String? {
        guard amountMib >= 0 else { return "amount_mib must not be negative (got \(amountMib))" }
        guard amountMib < memSizeMib else { return "amount_mib (\(amountMib)) must be less than the machine's mem_size_mib (\(memSizeMib))" }
        if let s = statsPollingIntervalS, !Self.statsIntervalRange.contains(s) {
            return "stats_polling_interval_s must be between \(Self.statsIntervalRange.lowerBound) and \(Self.statsIntervalRange.upperBound) (got \(s))"
        }
        return nil
    }
}

/// `GET /balloon/statistics`: the target and what the guest holds, then the guest's own
/// figures (bytes, or counts), each present once the guest has reported it.
public struct BalloonStatistics: Codable, Sendable, Equatable {
    public var targetPages: UInt32
    public var actualPages: UInt32
    public var targetMib: UInt32
    public var actualMib: UInt32
    public var guest: [String: UInt64]
    /// The guest's statistics by name, in the order of their virtio tags (0 to 9).
    public static let guestFields = ["swap_in", "swap_out", "major_faults", "minor_faults", "free_memory", "total_memory",
                                     "available_memory", "disk_caches", "hugetlb_allocations", "hugetlb_failures"]

    public init(targetPages: UInt32, actualPages: UInt32, guest: [String: UInt64]) {
        self.targetPages = targetPages; self.actualPages = actualPages
        targetMib = targetPages / 256; actualMib = actualPages / 256
        self.guest = guest
    }

    struct Key: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(_ s: String) { stringValue = s }
        init?(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    /// Flat, as Firecracker answers: `{"target_pages": …, "actual_pages": …, "free_memory": …}`.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: Key.self)
        try c.encode(targetPages, forKey: Key("target_pages"))
        try c.encode(actualPages, forKey: Key("actual_pages"))
        try c.encode(targetMib, forKey: Key("target_mib"))
        try c.encode(actualMib, forKey: Key("actual_mib"))
        for (k, v) in guest { try c.encode(v, forKey: Key(k)) }
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: Key.self)
        targetPages = try c.decode(UInt32.self, forKey: Key("target_pages"))
        actualPages = try c.decode(UInt32.self, forKey: Key("actual_pages"))
        targetMib = try c.decode(UInt32.self, forKey: Key("target_mib"))
        actualMib = try c.decode(UInt32.self, forKey: Key("actual_mib"))
        var g: [String: UInt64] = [:]
        for k in c.allKeys where !["target_pages", "actual_pages", "target_mib", "actual_mib"].contains(k.stringValue) {
            g[k.stringValue] = try c.decode(UInt64.self, forKey: k)
        }
        guest = g
    }
}

/// `GET /`'s `state`.
public enum InstanceState: String, Codable, Sendable {
    case notStarted = "Not started"
    case running = "Running"
    case paused = "Paused"
}

/// What the API drives: the VMM behind `mvm-vmm`. Calls come from the API's thread; each
/// either does what it says or throws an error whose text becomes the 400's `fault_message`.
public protocol VMMController: AnyObject, Sendable {
    var state: InstanceState { get }
    /// Builds and boots the machine `config` describes (`InstanceStart`).
    func start(_ config: VMConfiguration) throws
    /// Stops every vCPU outside the guest (`PATCH /vm {"state": "Paused"}`).
    func pause() throws
    /// Lets the vCPUs run again (`PATCH /vm {"state": "Resumed"}`).
    func resume() throws
    /// Presses Ctrl-Alt-Del on the i8042 keyboard: the guest reboots, which ends this VM.
    func sendCtrlAltDel() throws
    /// The VMM's counters in Prometheus' text format (`GET /metrics`, `FlushMetrics`).
    func metricsText() -> String
    /// A running machine's balloon takes this much of the guest's memory (`PATCH /balloon`).
    func setBalloon(amountMib: Int) throws
    /// The balloon's target, what the guest holds in it, and the guest's last statistics.
    func balloonStatistics() throws -> BalloonStatistics
    /// A new interval for the guest's statistics (`PATCH /balloon/statistics`).
    func setBalloonStatisticsInterval(_ seconds: Int) throws
    /// A running machine gets this many vCPUs (`PATCH /machine-config {"vcpu_count"}` after
    /// InstanceStart), where it has CPU hotplug.
    func setVCPUs(_ count: Int) throws
}

/// A controller whose machine keeps the vCPUs it booted with says so.
public struct NoCPUHotplug: Error, CustomStringConvertible {
    public init() {}
    public var description: String {
        "this VMM has no CPU hotplug: the vCPU count is fixed at InstanceStart; PATCH /machine-config before it"
    }
}

/// A controller without a balloon device says so.
public struct NoBalloonDevice: Error, CustomStringConvertible {
    public init() {}
    public var description: String { "no balloon device is configured: PUT /balloon before InstanceStart" }
}

extension VMMController {
    public func setBalloon(amountMib: Int) throws { throw NoBalloonDevice() }
    public func balloonStatistics() throws -> BalloonStatistics { throw NoBalloonDevice() }
    public func setBalloonStatisticsInterval(_ seconds: Int) throws { throw NoBalloonDevice() }
    public func setVCPUs(_ count: Int) throws { throw NoCPUHotplug() }
}
