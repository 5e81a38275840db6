import Foundation
import Launch
import MicroVMCore

/// The binaries every backend runs: a guest image's kernel, initrd and rootfs disk for VMs, and
/// the same rootfs as a tree for containers and native runs.
public struct Workload: Sendable {
    public var kernel: String?
    public var initrd: String?
    public var rootfsDisk: String?
    /// The tree containers run in and native runs chroot into ("/" runs on the host's own binaries).
    public var rootfsTree: String
    public var kernelVersion: String?
    /// Where this came from, for the results file.
    public var source: String

    public init(kernel: String? = nil, initrd: String? = nil, rootfsDisk: String? = nil, rootfsTree: String = "/", kernelVersion: String? = nil, source: String) {
        self.kernel = kernel; self.initrd = initrd; self.rootfsDisk = rootfsDisk; self.rootfsTree = rootfsTree
        self.kernelVersion = kernelVersion; self.source = source
    }

    /// The host's own binaries: only for native and for tests where no image is built.
    public static let host = Workload(source: "host root filesystem (/)")

    /// The programs of `tools` found in none of the rootfs tree's PATH directories (a link
    /// counts, whatever it points to: an applet link of busybox, an absolute link inside an image).
    public func missing(_ tools: [String]) -> [String] {
        let dirs = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        let root = rootfsTree == "/" ? "" : rootfsTree
        return tools.filter { tool in
            !dirs.contains { dir in
                var st = stat()
                return lstat(root + dir + "/" + tool, &st) == 0
            }
        }
    }

    /// The files a launch plan takes when a spec names none: this workload's, or the default image's.
    var artifacts: (@Sendable () throws -> BootArtifacts)? {
        guard let kernel else { return nil }
        let a = BootArtifacts(kernel: kernel, initrd: initrd, rootfsDisk: rootfsDisk, rootfsTree: rootfsTree, kernelVersion: kernelVersion)
        return { a }
    }

    /// One instance's spec: every backend gets the same slice and the same binaries. VM backends
    /// boot the default image's kernel and initrd themselves, with this workload's disk.
    public func spec(name: String, command: [String], slice: ResourceSlice, timeout: Double) -> VMSpec {
        var spec = VMSpec(name: name, cpus: slice.cpus, memory: slice.memory, command: command, rootfs: rootfsTree,
                          slice: slice, timeout: timeout)
        // An image's own disk (`--image`); VMs otherwise boot their image's default one.
        spec.rootfsDisk = rootfsDisk
        return spec
    }
}

/// A backend as the bench sees it.
public struct BenchTarget: Sendable {
    public var record: BackendRecord
    public var backend: (any InstanceBackend)?
    /// How an instance reaches a server on the host (network scenarios).
    public var network: NetworkPath
    public var name: String { record.name }

    public init(record: BackendRecord, backend: (any InstanceBackend)?, network: NetworkPath = .unavailable("no network path to the host")) {
        self.record = record; self.backend = backend; self.network = network
    }

    /// The spec's network and the host address the instance's client should dial, or why there is none.
    public func link() throws -> (net: NetSpec?, hostAddress: String) {
        switch network {
        case .unavailable(let why): throw ScenarioUnavailable(why)
        case .hostLoopback: return (nil, "127.0.0.1")
        case .backendNetwork(let host): return (NetSpec(), host)
        case .perInstanceLink:
            // A free /30 of its own in 10.201/16, away from the backends' automatic 10.200/16 links.
            let s = try HostLinks.freeSubnet(prefix: "10.201")
            return (NetSpec(hostAddress: s.host, guestAddress: s.instance), s.host)
        }
    }
}

/// How a backend's instances reach the host.
public enum NetworkPath: Sendable, Equatable {
    case unavailable(String)
    /// The host's own network (native runs): loopback.
    case hostLoopback
    /// A link per instance made by the backend from `VMSpec.net` (a veth pair for runc, a tap for VMs).
    case perInstanceLink
    /// The backend's own network (Docker's bridge), with the host at this address.
    case backendNetwork(host: String)
}

/// Workload lengths: `--quick` keeps a TCG VM run to seconds; `--full` gives steadier numbers.
public struct BenchDurations: Codable, Sendable, Equatable {
    public var cpuSeconds: Double
    public var memorySeconds: Double
    public var syscallSeconds: Double
    public var fioSeconds: Double
    public var fioSize: ByteCount
    public var networkSeconds: Double
    public var victimSeconds: Double
    public var parallelLaunches: Int
    public var idleInstances: Int
    /// Seconds an instance may take (boot included) before it is killed.
    public var instanceTimeout: Double
    /// Seconds a cell gets beyond its instances' timeouts (setup, teardown) before it is abandoned.
    public var cellMargin: Double = 30

    public static let quick = BenchDurations(cpuSeconds: 2, memorySeconds: 2, syscallSeconds: 2, fioSeconds: 2, fioSize: .mebibytes(16),
                                             networkSeconds: 2, victimSeconds: 4, parallelLaunches: 2, idleInstances: 2, instanceTimeout: 90)
    public static let full = BenchDurations(cpuSeconds: 10, memorySeconds: 10, syscallSeconds: 10, fioSeconds: 10, fioSize: .mebibytes(256),
                                            networkSeconds: 10, victimSeconds: 10, parallelLaunches: 4, idleInstances: 4, instanceTimeout: 600)

    public var asDictionary: [String: Double] {
        ["cpuSeconds": cpuSeconds, "memorySeconds": memorySeconds, "syscallSeconds": syscallSeconds,
         "fioSeconds": fioSeconds, "fioSizeBytes": Double(fioSize.bytes), "networkSeconds": networkSeconds,
         "victimSeconds": victimSeconds, "parallelLaunches": Double(parallelLaunches), "idleInstances": Double(idleInstances),
         "instanceTimeout": instanceTimeout]
    }
}

/// What a scenario needs besides the backend.
public struct BenchContext: Sendable {
    public var workload: Workload
    public var slice: ResourceSlice
    public var durations: BenchDurations
    /// Grants each instance its slice (the allocator) or hands out `slice` as is.
    public var slices: SliceSource
    /// Set for emulated VMs in `--quick`: one boot per start measurement, no parallel launches.
    public var serialStartsOnly = false
    public init(workload: Workload, slice: ResourceSlice, durations: BenchDurations, slices: SliceSource = .fixed) {
        self.workload = workload; self.slice = slice; self.durations = durations; self.slices = slices
    }

    /// Runs one instance to completion on a backend with the bench slice.
    public func run(_ target: BenchTarget, _ command: [String], tag: String, net: NetSpec? = nil, disks: [DiskSpec] = []) async throws -> RunResult {
        guard let backend = target.backend else {
            throw ScenarioUnavailable(target.record.unavailableReason ?? "backend not available")
        }
        let name = "bench-\(tag)-\(UUID().uuidString.prefix(6).lowercased())"
        return try await run(backend, target: target, name: name, command: command, net: net, disks: disks)
    }

    /// Runs one named instance in a slice granted for it alone, released when it ends, through
    /// the one launch path `mvm run` takes. The clock starts before the grant, so every
    /// backend's phases cover the same interval: request, validation, grant, plan, backend.
    func run(_ backend: any InstanceBackend, target: BenchTarget, name: String, command: [String], net: NetSpec? = nil, disks: [DiskSpec] = [],
             balloon: BalloonSpec? = nil) async throws -> RunResult {
        let clock = LaunchClock()
        let lease = slices.lease(slice, owner: name, mode: target.record.mode, backend: target.name)
        defer { lease.release() }
        var spec = workload.spec(name: name, command: command, slice: lease.slice, timeout: durations.instanceTimeout)
        spec.net = net
        spec.disks = disks
        spec.balloon = balloon
        return try await InstanceLauncher(image: workload.artifacts).launch(spec, on: backend, clock: clock)
    }
}

/// What a metric is, for tables and charts.
public struct Metric: Sendable, Hashable {
    public var id: String
    public var title: String
    public var unit: String
    public var higherIsBetter: Bool
    public init(_ id: String, _ title: String, unit: String, higherIsBetter: Bool) {
        self.id = id; self.title = title; self.unit = unit; self.higherIsBetter = higherIsBetter
    }
}

/// One measured value (a scenario may give several per run, e.g. one per parallel launch).
public struct Measurement: Sendable {
    public var metric: Metric
    public var value: Double
    public var details: [String: String]
    /// Set when this metric could not be measured on the backend (value is then meaningless).
    public var unavailable: String?
    public init(_ metric: Metric, _ value: Double, details: [String: String] = [:]) {
        self.metric = metric; self.value = value; self.details = details
    }
    public static func unavailable(_ metric: Metric, _ reason: String) -> Measurement {
        var m = Measurement(metric, .nan); m.unavailable = reason; return m
    }
}

/// Thrown by a scenario that cannot run on a backend; the cell reads `unavailable: reason`.
public struct ScenarioUnavailable: Error, CustomStringConvertible, Sendable {
    public var reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { reason }
}

/// A benchmark scenario: runs commands through a backend and parses the tools' output.
public protocol BenchScenario: Sendable {
    var name: String { get }
    /// The metrics it reports, so unavailable backends still get a labelled cell for each.
    func metrics(for ctx: BenchContext) -> [Metric]
    /// Instance runs one `measure` makes, for the progress estimate.
    func runsPerMeasure(_ ctx: BenchContext) -> Int
    /// A caveat that says how the number was obtained (recorded in each cell).
    var note: String? { get }
    /// False for a scenario that measures the host's VMM binaries on tiny guests rather than
    /// workloads through the backend: it runs where the backend cannot (a software KVM).
    var needsBackend: Bool { get }
    /// The programs it runs inside the instance: a workload whose rootfs lacks one (an image
    /// given with `--image`) leaves its cells unavailable, saying which.
    var tools: [String] { get }
    func measure(_ target: BenchTarget, _ ctx: BenchContext) async throws -> [Measurement]
}

extension BenchScenario {
    public func runsPerMeasure(_ ctx: BenchContext) -> Int { 1 }
    public var note: String? { nil }
    public var needsBackend: Bool { true }
    public var tools: [String] { [] }
}

/// Checks a tool run: a failed command is an error carrying its output's tail.
func requireSuccess(_ r: RunResult, _ what: String) throws -> String {
    guard r.exitStatus == 0 else {
        throw MicroVMError(.backend, "\(what) exited with status \(r.exitStatus): \(r.output.suffix(400))")
    }
    return r.output
}
