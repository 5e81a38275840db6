import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// Which backend runs an instance.
public enum RunMode: String, Codable, Sendable, CaseIterable {
    case direct      // our own VMM on /dev/kvm
    case hosted      // QEMU through libvirt
    case container   // an OCI runtime (runc, crun) or Docker
    case native      // the host itself, no isolation (benchmark baseline)
}

/// A disk attached to an instance: a raw image file, optionally read-only.
public struct DiskSpec: Codable, Sendable, Hashable {
    public var path: String
    public var readOnly: Bool
    public var direct: Bool  // O_DIRECT on the backing file
    public init(path: String, readOnly: Bool = false, direct: Bool = false) {
        self.path = path; self.readOnly = readOnly; self.direct = direct
    }
    /// Parses "FILE[,ro][,direct]".
    public init(parsing text: String) throws {
        var parts = text.split(separator: ",").map(String.init)
        guard !parts.isEmpty, !parts[0].isEmpty else { throw MicroVMError.invalidArgument("--disk needs a file: --disk FILE[,ro][,direct]") }
        let path = parts.removeFirst()
        var ro = false, direct = false
        for p in parts {
            switch p {
            case "ro", "readonly": ro = true
            case "rw": ro = false
            case "direct": direct = true
            default: throw MicroVMError.invalidArgument("unknown disk option '\(p)' in '\(text)': use ro, rw or direct")
            }
        }
        self.init(path: path, readOnly: ro, direct: direct)
    }
}

/// A network attachment: a tap device on the host (named, or created by MicroVM).
public struct NetSpec: Codable, Sendable, Hashable {
    public var tap: String?
    public var hostAddress: String?
    public var guestAddress: String?
    public init(tap: String? = nil, hostAddress: String? = nil, guestAddress: String? = nil) {
        self.tap = tap; self.hostAddress = hostAddress; self.guestAddress = guestAddress
    }

    /// Parses `tap[=NAME][,host=ADDR[/LEN]][,guest=ADDR[/LEN]]`.
    public init(parsing text: String) throws {
        var parts = text.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        let head = parts.removeFirst()
        let usage = "use --net tap[=NAME][,host=ADDR[/LEN]][,guest=ADDR[/LEN]]"
        if head == "tap" { self.init() }
        else if head.hasPrefix("tap="), head.count > 4 { self.init(tap: String(head.dropFirst(4))) }
        else { throw MicroVMError.invalidArgument("--net '\(text)' is not understood: \(usage)") }
        for p in parts {
            let kv = p.split(separator: "=", maxSplits: 1).map(String.init)
            guard kv.count == 2, !kv[1].isEmpty else { throw MicroVMError.invalidArgument("--net option '\(p)' in '\(text)' has no value: \(usage)") }
            guard Self.isIPv4CIDR(kv[1]) else {
                throw MicroVMError.invalidArgument("--net \(kv[0])=\(kv[1]) is not an IPv4 address (a.b.c.d or a.b.c.d/len): \(usage)")
            }
            switch kv[0] {
            case "host": hostAddress = kv[1]
            case "guest": guestAddress = kv[1]
            default: throw MicroVMError.invalidArgument("unknown --net option '\(kv[0])' in '\(text)': \(usage)")
            }
        }
    }

    /// a.b.c.d or a.b.c.d/len with each part in range.
    public static func isIPv4CIDR(_ s: String) -> Bool {
        let halves = s.split(separator: "/", omittingEmptySubsequences: false)
        guard halves.count <= 2 else { return false }
        if halves.count == 2 { guard let l = Int(halves[1]), (1...32).contains(l) else { return false } }
        let octets = halves[0].split(separator: ".", omittingEmptySubsequences: false)
        return octets.count == 4 && octets.allSatisfy { o in o.count <= 3 && Int(o).map { (0...255).contains($0) } == true }
    }
}

/// What to run, independent of the backend. Every mode reads the same spec.
public struct VMSpec: Codable, Sendable, Hashable {
    public var name: String
    public var kernel: String?
    public var initrd: String?
    /// Extra kernel command-line arguments, appended to what the backend needs.
    public var cmdline: String
    public var cpus: Int
    /// The most vCPUs a hosted VM may be given while it runs (`mvm update --cpus`): the machine
    /// boots with room for them (CPU hotplug) and `cpus` of them present. nil: `cpus`, fixed.
    public var maxCPUs: Int?
    public var memory: ByteCount
    public var disks: [DiskSpec]
    public var net: NetSpec?
    public var vsockCID: UInt32?
    /// With a vsock CID: the guest init starts the guest agent on `GuestProtocol.vsockShellPort` while the
    /// command runs. Any host process may connect to it (vsock has no credentials), so it is
    /// for hosts whose users are trusted, and off unless asked for.
    public var vsockShell = false
    /// With the guest agent: the init runs no command itself but waits for the host to run it
    /// through the agent (its stdio streamed live, signals delivered to it, as a container's
    /// process is) and ends the VM with that process's status.
    public var agentRunsCommand: Bool?
    /// A memory balloon (direct VMs): how much of the guest's memory the host may take back, and
    /// how the guest reports what it uses and frees.
    public var balloon: BalloonSpec?
    /// The command the guest init runs (empty: the init's default, `true`).
    public var command: [String]
    /// The rootfs tree for containers (the same tree the VM's disk is made from).
    public var rootfs: String?
    /// A VM's root disk in place of the default image's (an image's converted rootfs), attached
    /// read-only as /dev/vda; the default image still gives the kernel and initramfs.
    public var rootfsDisk: String?
    /// The command's environment (NAME=VALUE), in place of the default one; nil: the default.
    public var environment: [String]?
    /// The directory the command starts in (absolute); nil: /.
    public var workingDirectory: String?
    public var slice: ResourceSlice?
    /// Seconds before the instance is killed.
    public var timeout: Double

    public init(name: String = "mvm-\(UUID().uuidString.prefix(8).lowercased())", kernel: String? = nil, initrd: String? = nil,
                cmdline: String = "", cpus: Int = 1, memory: ByteCount = .mebibytes(256), disks: [DiskSpec] = [],
                net: NetSpec? = nil, vsockCID: UInt32? = nil, command: [String] = [], rootfs: String? = nil,
                slice: ResourceSlice? = nil, timeout: Double = 300) {
        self.name = name; self.kernel = kernel; self.initrd = initrd; self.cmdline = cmdline
        self.cpus = cpus; self.memory = memory; self.disks = disks; self.net = net; self.vsockCID = vsockCID
        self.command = command; self.rootfs = rootfs; self.slice = slice; self.timeout = timeout
    }

    /// Checks the sizes and flags that need no file system (`SpecValidator` checks the rest).
    public func validateSizes() throws {
        guard cpus >= 1 else { throw MicroVMError.invalidArgument("--cpus must be at least 1 (got \(cpus))") }
        guard cpus <= 255 else { throw MicroVMError.invalidArgument("--cpus \(cpus) is more than the 255 vCPUs x86 xAPIC ids allow") }
        if let maxCPUs, !(cpus...255).contains(maxCPUs) {
            throw MicroVMError.invalidArgument("--max-cpus \(maxCPUs) must be between --cpus (\(cpus)) and 255: it is the most vCPUs the VM can be given while it runs")
        }
        guard memory >= .mebibytes(16) else { throw MicroVMError.invalidArgument("--memory \(memory) is too small: a Linux guest needs at least 16M") }
        if vsockShell, vsockCID == nil {
            throw MicroVMError.invalidArgument("--vsock-shell needs --vsock CID: the agent listens on the VM's vsock device")
        }
    }
}

extension VMSpec {
    /// The first entry of a command's environment that is not NAME=VALUE (or holds a NUL the
    /// guest's command line cannot carry), if any: for `environment`, an image's Env, a bundle's.
    public static func badEnvironmentEntry(_ env: [String]) -> String? {
        env.first { !$0.contains("=") || $0.hasPrefix("=") || $0.contains("\u{0}") }
    }

    /// Whether `dir` can be a command's working directory: absolute, without NUL.
    public static func isWorkingDirectory(_ dir: String) -> Bool { dir.hasPrefix("/") && !dir.contains("\u{0}") }
}

/// A virtio-balloon device: its initial size, and what the guest is asked to do.
public struct BalloonSpec: Codable, Sendable, Hashable {
    /// Memory the balloon holds from the start (taken from the guest's RAM).
    public var amount: ByteCount
    /// The guest may take pages back from the balloon when it would otherwise run out.
    public var deflateOnOOM: Bool
    /// Seconds between the guest's statistics reports; 0: none.
    public var statsInterval: Int
    /// The guest reports the pages it frees, and the host discards them.
    public var freePageReporting: Bool
    public init(amount: ByteCount = ByteCount(0), deflateOnOOM: Bool = true, statsInterval: Int = 1, freePageReporting: Bool = true) {
        self.amount = amount; self.deflateOnOOM = deflateOnOOM; self.statsInterval = statsInterval; self.freePageReporting = freePageReporting
    }
}

/// Where an instance ended up.
public struct RunResult: Codable, Sendable {
    public var exitStatus: Int32
    public var output: String
    /// Seconds from launch to the guest init's boot-complete signal (or the container's first instruction).
    public var bootSeconds: Double?
    /// Seconds from launch to the end of the run.
    public var totalSeconds: Double
    /// The raw console, for `mvm logs` and for errors.
    public var console: String
    /// Seconds from the launch request to each phase (`bootSeconds` is `phases.start`).
    public var phases: LaunchPhases?
    public init(exitStatus: Int32, output: String, bootSeconds: Double?, totalSeconds: Double, console: String, phases: LaunchPhases? = nil) {
        self.exitStatus = exitStatus; self.output = output; self.bootSeconds = bootSeconds
        self.totalSeconds = totalSeconds; self.console = console; self.phases = phases
    }
}

/// A live instance as `mvm ps` lists it.
public struct InstanceInfo: Codable, Sendable {
    public var name: String
    public var mode: RunMode
    public var state: String
    public var pid: Int32?
    public var cpus: Int
    public var memory: ByteCount
    public var startedAt: Date?
    public var logPath: String?
    /// What a user should know of how it runs, e.g. "no jail" for a direct VMM run with --no-jail.
    public var note: String?
    public init(name: String, mode: RunMode, state: String, pid: Int32? = nil, cpus: Int, memory: ByteCount, startedAt: Date? = nil,
                logPath: String? = nil, note: String? = nil) {
        self.name = name; self.mode = mode; self.state = state; self.pid = pid; self.cpus = cpus
        self.memory = memory; self.startedAt = startedAt; self.logPath = logPath; self.note = note
    }
}

/// How an instance's network reaches the host.
public enum NetworkAttachment: Sendable, Equatable {
    /// A tap (VMs) or veth pair (runc) of its own, on a /30 the launch plan names.
    case perInstanceLink
    /// The backend's own network, which addresses the instance itself (Docker's bridge).
    case backendNetwork
}

/// What every backend (direct VMM, libvirt, containers, native) implements. A backend executes
/// plans: `InstanceLauncher` validates the spec, takes the grant and resolves the `LaunchPlan`;
/// `run(_:)` (in the Launch module) is that path without an allocator.
public protocol InstanceBackend: Sendable {
    var mode: RunMode { get }
    /// Kernel parameters this backend's VMs need on top of the common command line.
    var kernelParameters: String { get }
    /// Whether a VM of this spec gets the image's rootfs disk as /dev/vda (containers always run
    /// in the tree).
    func attachesRootfs(to spec: VMSpec) -> Bool
    /// How `--net` reaches the host: a link of the instance's own (its /30 chosen by the launcher)
    /// or the backend's own network (Docker's bridge).
    var networkAttachment: NetworkAttachment { get }
    /// Checks that this host can run the plan's kind of instance, before anything is allocated.
    func checkHost() throws
    /// The guest image this backend was given, if any (nil: the launcher's default image).
    func defaultArtifacts() throws -> BootArtifacts?
    /// Runs a plan to completion: boot, run the command, collect the framed result, tear down.
    func execute(_ plan: LaunchPlan) async throws -> RunResult
    /// Instances this backend knows about.
    func list() async throws -> [InstanceInfo]
    /// Stops an instance by name (graceful, then forced).
    func stop(name: String) async throws
    /// The console or output log of an instance.
    func logs(name: String) async throws -> String
    /// Holds a running instance's vCPUs (or processes) without ending it.
    func pause(name: String) async throws
    /// Lets a paused instance run again.
    func resume(name: String) async throws
    /// The instance's counters as text (Prometheus' format where the backend keeps them).
    func stats(name: String) async throws -> String
    /// Runs a command inside a running instance; its exit status and output (stdout and stderr).
    func exec(name: String, command: [String]) async throws -> (status: Int32, output: String)
    /// The vsock context id of a running VM's guest agent, which `mvm exec` streams through;
    /// nil for instances that run commands another way (containers). Throws, saying how to start
    /// one, for a VM without an agent.
    func agentCID(name: String) async throws -> UInt32?
    /// Throws, before anything changes, when a running instance of this backend cannot take
    /// `to` in place of `from` live (a VM's vCPU count, say): the error says what can change.
    func checkUpdate(name: String, from: Enforcement, to: Enforcement) throws
    /// Enforces `to` on the running instance `name`: its cgroup, runtime or hypervisor. A
    /// failure leaves the instance as it was where the backend can undo what it changed.
    func update(name: String, from: Enforcement, to: Enforcement) async throws
    /// What a running VM with a balloon holds and uses (nil: no balloon, nothing to move).
    func memoryUse(name: String) async throws -> GuestMemoryUse?
}

/// A ballooned VM's memory as its balloon's statistics show it.
public struct GuestMemoryUse: Sendable, Equatable, Codable {
    /// The memory it booted with: the most its balloon can give it.
    public var boot: ByteCount
    /// What the balloon leaves it now.
    public var current: ByteCount
    /// What the guest uses: its total less what it says is available and what the balloon
    /// holds (nil until the guest has reported its statistics).
    public var used: ByteCount?
    public init(boot: ByteCount, current: ByteCount, used: ByteCount?) { self.boot = boot; self.current = current; self.used = used }

    /// From the balloon's target and size (4 KiB pages) and the guest's statistics (bytes).
    public init(boot: ByteCount, balloonPages: UInt32, guestTotal: UInt64?, guestAvailable: UInt64?) {
        let balloon = UInt64(balloonPages) * 4096
        self.boot = boot
        current = ByteCount(boot.bytes >= balloon ? boot.bytes - balloon : 0)
        if let total = guestTotal, let available = guestAvailable, total > 0 {
            // With deflate-on-OOM Linux keeps the balloon in its total (its pages are allocated,
            // so not available); without, the total shrinks by it.
            // The figures are the guest's: nothing here may overflow on what it says.
            let taken = ByteCount(available) + ByteCount(total > current.bytes ? balloon : 0)
            used = ByteCount(total) - taken
        } else {
            used = nil
        }
    }
}

extension InstanceBackend {
    public var kernelParameters: String { "" }
    public func attachesRootfs(to spec: VMSpec) -> Bool { mode.isVM }
    public var networkAttachment: NetworkAttachment { .perInstanceLink }
    public func checkHost() throws {}
    public func defaultArtifacts() throws -> BootArtifacts? { nil }
    public func list() async throws -> [InstanceInfo] { [] }
    public func stop(name: String) async throws { throw MicroVMError.unsupported("\(mode) backend cannot stop instances") }
    public func logs(name: String) async throws -> String { throw MicroVMError.unsupported("\(mode) backend keeps no logs") }
    public func pause(name: String) async throws { throw MicroVMError.unsupported("\(mode) instances cannot be paused by mvm: pause and resume work for direct and hosted instances") }
    public func resume(name: String) async throws { throw MicroVMError.unsupported("\(mode) instances cannot be paused or resumed by mvm: pause and resume work for direct and hosted instances") }
    public func stats(name: String) async throws -> String { throw MicroVMError.unsupported("\(mode) instances keep no counters mvm can read: mvm stats works for direct and hosted instances") }
    public func exec(name: String, command: [String]) async throws -> (status: Int32, output: String) {
        throw MicroVMError.unsupported("\(mode) instances have no agent to run commands in: mvm exec works for containers and for direct and hosted VMs started with --vsock CID --vsock-shell")
    }
    public func checkUpdate(name: String, from: Enforcement, to: Enforcement) throws {
        throw MicroVMError.unsupported("\(mode) instances cannot be resized while they run: mvm update works for containers, and for direct VMs")
    }
    public func update(name: String, from: Enforcement, to: Enforcement) async throws { try checkUpdate(name: name, from: from, to: to) }
    public func memoryUse(name: String) async throws -> GuestMemoryUse? { nil }
    public func agentCID(name: String) async throws -> UInt32? { nil }
}
