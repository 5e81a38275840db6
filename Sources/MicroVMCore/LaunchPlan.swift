import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// The phases of one launch, each marked once on CLOCK_MONOTONIC. Every backend's start figure is
/// the same interval: from the launch request (before validation, as a user's command would) to
/// `ready` (a container's first instruction, a VM init's boot-complete).
public enum LaunchPhase: String, Codable, Sendable, CaseIterable, Comparable {
    /// The whole spec was checked (files, sizes, names, network, timeouts).
    case validated
    /// The allocator granted the slice.
    case granted
    /// Boot files, disks, command line and enforcement were resolved.
    case planned
    /// The backend's process or VM exists (runtime started, VM created, domain defined).
    case spawned
    /// The instance executed its first instruction: a container's command started; a VM's first
    /// vCPU entry (direct) or QEMU's start (hosted).
    case firstInstruction
    /// The instance is ready to run the command: a container's first instruction, a VM's
    /// init reporting boot-complete.
    case ready
    /// The command's result is in.
    case exited

    public static func < (a: LaunchPhase, b: LaunchPhase) -> Bool {
        allCases.firstIndex(of: a)! < allCases.firstIndex(of: b)!
    }
}

/// Marks phases of one launch on the monotonic clock, relative to the launch request.
public final class LaunchClock: Sendable {
    /// `Monotonic.seconds()` at the launch request.
    public let origin: Double
    private let marks = Mutex<[LaunchPhase: Double]>([:])

    public init(origin: Double = Monotonic.seconds()) { self.origin = origin }

    /// Records `phase` at `time` (now by default); the first mark of a phase stands.
    public func mark(_ phase: LaunchPhase, at time: Double = Monotonic.seconds()) {
        let first = marks.withLock { m in
            guard m[phase] == nil else { return false }
            m[phase] = max(0, time - origin)
            return true
        }
        if first, phase == Self.stopAt { Self.stopForKill(phase) }
    }

    /// Fault injection for kill tests: with `MVM_STOP_AT=PHASE` (granted, spawned, …) the process
    /// stops itself (SIGSTOP) the moment it reaches that phase, after saying so on stderr, so a
    /// test can kill it exactly there and look at what is left.
    static let stopAt: LaunchPhase? = ProcessInfo.processInfo.environment["MVM_STOP_AT"].flatMap(LaunchPhase.init(rawValue:))

    static func stopForKill(_ phase: LaunchPhase) {
        writeStandardError("mvm: stopped at \(phase.rawValue) (MVM_STOP_AT)\n")
        raise(SIGSTOP)
    }

    /// Seconds since the launch request.
    public func elapsed(now: Double = Monotonic.seconds()) -> Double { now - origin }

    public var phases: LaunchPhases { LaunchPhases(seconds: marks.withLock { $0 }) }
}

/// Seconds from the launch request to each phase that was reached.
public struct LaunchPhases: Codable, Sendable, Equatable {
    public var seconds: [LaunchPhase: Double]
    public init(seconds: [LaunchPhase: Double] = [:]) { self.seconds = seconds }

    public subscript(_ p: LaunchPhase) -> Double? { seconds[p] }

    /// The start figure: request to ready. Nothing else stands in for it.
    public var start: Double? { seconds[.ready] }

    /// "validated=0.4ms granted=1.2ms …" in phase order, for logs and sample details.
    public var summary: String {
        LaunchPhase.allCases.compactMap { p in seconds[p].map { "\(p.rawValue)=\(cFormat("%.1f", $0 * 1000))ms" } }
            .joined(separator: " ")
    }

    /// Phase → milliseconds, as a bench sample's details record it.
    public var details: [String: String] {
        Dictionary(uniqueKeysWithValues: seconds.map { ("phase.\($0.key.rawValue)", cFormat("%.3f", $0.value * 1000)) })
    }

    enum CodingKeys: CodingKey {}
    public init(from decoder: any Decoder) throws {
        let raw = try [String: Double](from: decoder)
        seconds = Dictionary(uniqueKeysWithValues: raw.compactMap { k, v in LaunchPhase(rawValue: k).map { ($0, v) } })
    }
    public func encode(to encoder: any Encoder) throws {
        try Dictionary(uniqueKeysWithValues: seconds.map { ($0.key.rawValue, $0.value) }).encode(to: encoder)
    }
}

/// What a VM boots and a container runs in: one guest image's files.
public struct BootArtifacts: Codable, Sendable, Equatable {
    public var kernel: String
    public var initrd: String?
    /// The ext4 image of the rootfs (VMs attach it as /dev/vda).
    public var rootfsDisk: String?
    /// The same rootfs as a tree (containers' root, native runs' chroot).
    public var rootfsTree: String?
    public var kernelVersion: String?
    public init(kernel: String, initrd: String? = nil, rootfsDisk: String? = nil, rootfsTree: String? = nil, kernelVersion: String? = nil) {
        self.kernel = kernel; self.initrd = initrd; self.rootfsDisk = rootfsDisk; self.rootfsTree = rootfsTree; self.kernelVersion = kernelVersion
    }
}

/// The one kernel command line every VM backend boots with: serial console, a quiet kernel,
/// reboot=k and panic=-1 so both a power-off and a panic end the VM, then the command, the
/// backend's own parameters, the init's parameters and the caller's extras, in that order.
public enum KernelCommandLine {
    public static let base = ["console=ttyS0", "quiet", "loglevel=3", "reboot=k", "panic=-1"]
    /// x86 Linux's COMMAND_LINE_SIZE, the terminating NUL included: the most a kernel that does
    /// not state its own limit takes.
    public static let maxBytes = 2048
    /// What the base, the command and the init's parameters may take, leaving the backends
    /// room for their devices' parameters (the direct VMM's virtio-mmio devices, for one).
    public static let specBudget = maxBytes - 1 - 512

    public static func build(command: [String], backend: String = "", rootfsReadOnly: Bool = false,
                             initParameters: [String] = [], extra: String = "") -> String {
        var parts = base
        if !command.isEmpty { parts.append("\(GuestProtocol.commandParameter)=\(GuestProtocol.encodeCommand(command))") }
        for p in [backend] + (rootfsReadOnly ? ["\(GuestProtocol.readOnlyRootParameter)=1"] : []) + initParameters + [extra] {
            let t = p.trimmed()
            if !t.isEmpty { parts.append(t) }
        }
        return parts.joined(separator: " ")
    }
}

/// A launch resolved and granted: what a backend executes. Backends do not resolve specs: the
/// boot files, disks (the rootfs first where attached), kernel command line and enforcement
/// come from here, and the backend marks its phases on `clock`.
public struct LaunchPlan: Sendable {
    /// The validated spec, its slice the granted one.
    public var spec: VMSpec
    public var mode: RunMode
    /// VMs: what to boot (nil for containers and native runs).
    public var kernel: String?
    public var initrd: String?
    /// VMs: the command line, the init's network parameters included; a backend appends only
    /// what its device layout decides (the direct VMM's virtio-mmio devices) with
    /// `commandLine(adding:)`.
    public var cmdline: String
    /// VMs: every disk in attach order, the image's rootfs (read-only) first when attached.
    public var disks: [DiskSpec]
    public var rootfsAttached: Bool
    /// Containers and native runs: the root tree.
    public var rootfsTree: String?
    public var enforcement: Enforcement
    public let clock: LaunchClock
    /// The backend calls this with the process that holds the instance's resources once it
    /// runs (the VMM, QEMU, a container's init): the grant then follows that process, so a
    /// killed `mvm` does not free what the instance still uses.
    public var holder: @Sendable (_ pid: Int32, _ what: String) -> Void = { _, _ in }

    public init(spec: VMSpec, mode: RunMode, kernel: String? = nil, initrd: String? = nil, cmdline: String = "", disks: [DiskSpec] = [],
                rootfsAttached: Bool = false, rootfsTree: String? = nil, enforcement: Enforcement, clock: LaunchClock = LaunchClock()) {
        self.spec = spec; self.mode = mode; self.kernel = kernel; self.initrd = initrd; self.cmdline = cmdline
        self.disks = disks; self.rootfsAttached = rootfsAttached; self.rootfsTree = rootfsTree
        self.enforcement = enforcement; self.clock = clock
    }

    public var name: String { spec.name }

    /// The command line with what the backend adds (its device parameters).
    public func commandLine(adding parameters: [String]) -> String {
        ([cmdline] + parameters).filter { !$0.isEmpty }.joined(separator: " ")
    }

    /// The result as every backend reports it: timings from the plan's clock, on one interval.
    public func result(status: Int32, output: String, console: String) -> RunResult {
        clock.mark(.exited)
        let phases = clock.phases
        return RunResult(exitStatus: status, output: output, bootSeconds: phases.start, totalSeconds: phases[.exited] ?? clock.elapsed(),
                         console: console, phases: phases)
    }
}
