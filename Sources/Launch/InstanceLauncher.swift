/// Launch: the one path every instance takes, whoever asks (`mvm run`, `mvm bench`, the library):
/// validate the whole spec, take the grant, resolve a `LaunchPlan`, hand it to the backend,
/// release. Each step is marked on one monotonic clock that starts at the launch request.
///
/// ```swift
/// let launcher = InstanceLauncher(grants: AllocatorGrants(config: try .load()))
/// let result = try await launcher.launch(VMSpec(command: ["uname", "-r"]), on: ContainerBackend(runtime: .runc))
/// print(result.phases?.summary ?? "")   // validated=0.2ms granted=3.1ms planned=3.3ms … ready=41.0ms
/// ```
import Foundation
import Allocator
import Images
import MicroVMCore

/// Where a launch gets its slice: the allocator (a grant recorded in the ledger, released after
/// the run) or the spec itself (tests, and callers that hold their own lease).
public protocol GrantSource: Sendable {
    /// The granted slice for `request`, how to give it back, and how to name its holder.
    func acquire(_ request: ResourceSlice, owner: String, mode: RunMode) throws -> GrantLease
}

/// A granted slice for one launch.
public struct GrantLease: Sendable {
    public var slice: ResourceSlice
    public var release: @Sendable () -> Void
    /// Records the process that holds the slice's resources (`Allocator.hold`).
    public var hold: @Sendable (_ pid: Int32, _ what: String) -> Void
    public init(slice: ResourceSlice, release: @escaping @Sendable () -> Void = {},
                hold: @escaping @Sendable (_ pid: Int32, _ what: String) -> Void = { _, _ in }) {
        self.slice = slice; self.release = release; self.hold = hold
    }
}

/// The slice as asked for: no ledger.
public struct FixedGrants: GrantSource {
    public init() {}
    public func acquire(_ request: ResourceSlice, owner: String, mode: RunMode) throws -> GrantLease {
        GrantLease(slice: request)
    }
}

/// Grants from the allocator's ledger, held by this process for the run. Made from a
/// configuration, it opens the ledger only when the first grant is asked for (after validation).
public struct AllocatorGrants: GrantSource {
    let open: @Sendable () throws -> Allocator
    public init(allocator: Allocator) { open = { allocator } }
    /// `warmup`, started when the command started, has the ledger open by the time it is needed.
    public init(config: MicroVMConfig, paths: Paths = .default, warmup: LedgerWarmup? = nil) {
        open = { try Allocator.open(paths: paths, config: config, warmup: warmup) }
    }

    public func acquire(_ s: ResourceSlice, owner: String, mode: RunMode) throws -> GrantLease {
        let allocator = try open()
        let request = SliceRequest(cpus: s.cpus, placement: s.placement, weight: s.cpuWeight, quota: s.cpuQuota, memory: s.memory,
                                   hugePages: s.hugePages, pidsLimit: s.pidsLimit, owner: owner, ownerPID: getpid(), mode: mode.rawValue)
        let grant = try allocator.allocate(request)
        return GrantLease(slice: grant.slice, release: { _ = try? allocator.release(grant.id) },
                          hold: { pid, what in try? allocator.hold(grant.id, pid: pid, what: what) })
    }
}

public struct InstanceLauncher: Sendable {
    public var grants: any GrantSource
    /// The default guest image's files, for specs that name no kernel or rootfs.
    public var image: @Sendable () throws -> BootArtifacts

    public init(grants: any GrantSource = FixedGrants(), image: (@Sendable () throws -> BootArtifacts)? = nil, paths: Paths = .default) {
        self.grants = grants
        self.image = image ?? { try ImageStore(paths: paths).ensureDefault().artifacts }
    }

    /// Validates, grants, plans, executes and releases. `clock` starts at the launch request:
    /// pass one made when the user's command started to count everything they wait for.
    public func launch(_ spec: VMSpec, on backend: any InstanceBackend, clock: LaunchClock = LaunchClock()) async throws -> RunResult {
        try SpecValidator.validate(spec, mode: backend.mode)
        try backend.checkHost()
        clock.mark(.validated)
        let asked = spec.slice ?? ResourceSlice(cpus: spec.cpus, memory: spec.memory)
        let lease = try grants.acquire(asked, owner: spec.name, mode: backend.mode)
        defer { lease.release() }
        clock.mark(.granted)
        var plan = try self.plan(spec, slice: lease.slice, backend: backend, clock: clock)
        plan.holder = lease.hold
        clock.mark(.planned)
        return try await backend.execute(plan)
    }

    /// Resolves a validated spec and its granted slice into what the backend executes.
    public func plan(_ spec: VMSpec, slice: ResourceSlice, backend: any InstanceBackend, clock: LaunchClock = LaunchClock()) throws -> LaunchPlan {
        var spec = spec
        spec.slice = slice
        spec.cpus = slice.cpus
        spec.memory = slice.memory
        let mode = backend.mode
        let enforcement = Enforcement(slice: slice, mode: mode)
        spec.net = try resolveLink(spec.net, backend: backend)
        guard mode.isVM else {
            let tree = try spec.rootfs ?? (mode == .native ? nil : artifacts(for: backend).rootfsTree)
            return LaunchPlan(spec: spec, mode: mode, disks: spec.disks, rootfsTree: tree, enforcement: enforcement, clock: clock)
        }
        let attach = backend.attachesRootfs(to: spec)
        let img = spec.kernel == nil || (attach && spec.rootfsDisk == nil) ? try artifacts(for: backend) : nil
        guard let kernel = spec.kernel ?? img?.kernel else {
            throw MicroVMError.notFound("no guest kernel: pass --kernel or build the default image (mvm image build)")
        }
        let initrd = spec.initrd ?? (spec.kernel == nil ? img?.initrd : nil)
        var disks = spec.disks
        let rootfs = attach ? spec.rootfsDisk ?? img?.rootfsDisk : nil
        if let rootfs { disks.insert(DiskSpec(path: rootfs, readOnly: true), at: 0) }
        let cmdline = KernelCommandLine.build(command: spec.command, backend: backend.kernelParameters, rootfsReadOnly: rootfs != nil,
                                              initParameters: spec.initParameters, extra: spec.cmdline)
        return LaunchPlan(spec: spec, mode: mode, kernel: kernel, initrd: initrd, cmdline: cmdline, disks: disks,
                          rootfsAttached: rootfs != nil, rootfsTree: spec.rootfs ?? img?.rootfsTree, enforcement: enforcement, clock: clock)
    }
}

extension InstanceLauncher {
    /// A link the backend makes (a new tap or veth pair) gets its addresses here, so the plan's
    /// command line already tells the guest init its address and gateway: a free /30 of
    /// 10.200/16 for what was not given. An existing tap is attached as it is.
    func resolveLink(_ net: NetSpec?, backend: any InstanceBackend) throws -> NetSpec? {
        guard var net, backend.networkAttachment == .perInstanceLink, backend.mode != .native else { return net }
        let existing = net.tap.map { FileManager.default.fileExists(atPath: "/sys/class/net/" + $0) } ?? false
        guard !existing, net.hostAddress == nil || net.guestAddress == nil else { return net }
        let free = try HostLinks.freeSubnet()
        net.hostAddress = HostLinks.withLength(net.hostAddress ?? free.host)
        net.guestAddress = HostLinks.withLength(net.guestAddress ?? free.instance)
        return net
    }

    func artifacts(for backend: any InstanceBackend) throws -> BootArtifacts {
        try backend.defaultArtifacts() ?? image()
    }
}

extension GuestImage {
    /// The files a launch plan takes from this image.
    public var artifacts: BootArtifacts {
        BootArtifacts(kernel: kernel, initrd: initrd, rootfsDisk: rootfsDisk, rootfsTree: rootfsTree, kernelVersion: kernelVersion)
    }
}

extension InstanceBackend {
    /// Runs a spec through the one launch path, without an allocator: the spec's slice (or its
    /// cpus and memory) is enforced as given.
    public func run(_ spec: VMSpec) async throws -> RunResult {
        try await InstanceLauncher().launch(spec, on: self)
    }
}
