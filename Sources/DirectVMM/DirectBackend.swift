import Allocator
import Devices
import VMM
import VMMAPI
import Foundation
import Launch
import Host
import Images
import LinuxBoot
import MicroVMCore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// `InstanceBackend` for `--mode direct`: boots the spec's kernel (or the default image) in an
/// `mvm-vmm` process of the instance's own, reads the guest init's framed result from the
/// console log, and tears everything down.
public struct DirectBackend: InstanceBackend {
    public struct Options: Sendable {
        /// Boot even when the host's KVM is not hardware (tiny test guests; Linux will not boot).
        /// Defaults to the environment variable `MVM_DIRECT_ALLOW_EMULATED=1`.
        public var allowEmulatedKVM: Bool
        public var paths: Paths
        public var devicePath: String
        /// Attach the default image's rootfs disk as /dev/vda (read-only, over virtio-blk) so the
        /// command runs with the image's tools, as in hosted and container modes. Without it the
        /// command runs in the initramfs (busybox only).
        public var attachRootfs: Bool
        /// Enforce the plan's slice in a cgroup of its own (as root).
        public var enforceInCgroup: Bool
        /// Run the VMM in its jail (`Jail`): its own PID, mount, IPC and UTS namespaces, an empty
        /// root, an unprivileged uid, no capabilities, seccomp per thread. As root, unless
        /// `mvm run --no-jail` (for debugging: `mvm ps` then says so) or `MVM_NO_JAIL=1`.
        public var jail: Bool
        /// The launching process runs other instances too (the bench). Its instances' records say
        /// so, and `stop(name:)`, from any process, then stops one through its VMM: a SIGTERM to
        /// the holder would end them all.
        public var sharedHolder: Bool
        /// An ended run keeps its console log for `mvm logs` (the newest `keptEndedRuns` do). The
        /// bench's throwaway instances do not: they would push the user's runs out.
        public var keepsEndedLog: Bool
        public init(allowEmulatedKVM: Bool = ProcessInfo.processInfo.environment["MVM_DIRECT_ALLOW_EMULATED"] == "1",
                    paths: Paths = .default, devicePath: String = "/dev/kvm",
                    attachRootfs: Bool = true, enforceInCgroup: Bool = getuid() == 0,
                    jail: Bool = getuid() == 0 && ProcessInfo.processInfo.environment["MVM_NO_JAIL"] != "1",
                    sharedHolder: Bool = false, keepsEndedLog: Bool = true) {
            self.allowEmulatedKVM = allowEmulatedKVM
            self.paths = paths; self.devicePath = devicePath; self.attachRootfs = attachRootfs
            self.enforceInCgroup = enforceInCgroup
            self.jail = jail
            self.sharedHolder = sharedHolder
            self.keepsEndedLog = keepsEndedLog
        }
    }

    /// Kernel parameters this VMM needs on top of the image's: no PS/2 mouse/mux/PnP probing
    /// (there is only a reset line), no PCI bus to scan.
    public static let kernelParameters = VirtualMachine.kernelParameters

    public let options: Options
    public var mode: RunMode { .direct }

    public init(options: Options = Options()) { self.options = options }

    /// Throws unless this host can boot Linux under KVM (or the caller opted in).
    public func checkHost() throws {
        let kvm = HostProfile.kvm(paths: options.paths)
        switch kvm.verdict {
        case .hardware: return
        case .absent:
            throw MicroVMError(.unsupported, "direct mode needs /dev/kvm: \(kvm.reason)")
        case .emulated where options.allowEmulatedKVM: return
        case .emulated:
            throw MicroVMError(.unsupported, "this host's KVM is emulated (\(kvm.reason)); a Linux guest cannot boot under it. Run it in the nested rig: `mvm rig run -- mvm run --mode direct …`, or use --mode hosted (QEMU TCG). Set MVM_DIRECT_ALLOW_EMULATED=1 only for tiny test guests.")
        }
    }

    public var kernelParameters: String { Self.kernelParameters }
    /// The image's rootfs goes with the image's kernel; a kernel of the caller's boots its own
    /// initrd alone (the shortest boot: no virtio devices, no ACPI tables).
    public func attachesRootfs(to spec: VMSpec) -> Bool { options.attachRootfs && spec.kernel == nil }
    public func defaultArtifacts() throws -> BootArtifacts? { try ImageStore(paths: options.paths).ensureDefault().artifacts }

    public func execute(_ plan: LaunchPlan) async throws -> RunResult {
        let spec = plan.spec
        guard let kernel = plan.kernel else { throw MicroVMError(.internalError, "a direct launch plan has no kernel") }
        // Every direct VM runs in an `mvm-vmm` process of its own, whoever launches it (`mvm run`,
        // the bench, a library caller): one boot path, and a VMM whose memory and CPU are its own.
        let binary = try Self.vmmBinary()
        let records = self.records
        let directory = options.paths.instances + "/" + spec.name
        var record = DirectInstanceRecord(name: spec.name, pid: getpid(), pidStart: ProcessIdentity.startTime(pid: getpid()),
                                          cpus: spec.cpus, memory: spec.memory, startedAt: Date(), logPath: directory + "/console.log")
        record.apiSocket = directory + "/api.sock"
        record.jailed = options.jail
        record.sharedHolder = options.sharedHolder ? true : nil
        record.vsockCID = spec.vsockCID
        record.vsockShell = spec.vsockCID != nil && spec.vsockShell
        if let b = spec.balloon {
            record.bootMemory = spec.memory
            record.memory = spec.memory - b.amount
        }
        // Named before they exist, so a killed run's leftovers are found from its record.
        record.tap = spec.net.map { TapLink.plannedTap($0, owner: spec.name) }.flatMap { $0.creates ? $0.name : nil }
        record.cgroup = options.enforceInCgroup ? Self.cgroupName(spec.name) : nil
        // A record lets `mvm ps/stop/logs` find the VM, and refuses a second one of that name.
        let logPath = try records.claim(record)
        defer {
            records.release(spec.name, owner: record)
            if options.keepsEndedLog { pruneEndedRuns() } else { try? FileManager.default.removeItem(atPath: directory) }
        }
        try Paths.ensureDirectory(directory)
        let cgroup = try enforce(plan)
        defer { try? cgroup?.remove() }
        return try await executeInVMMProcess(plan, kernel: kernel, binary: binary, record: record, records: records, logPath: logPath,
                                             cgroups: cgroup.map { Array(Set($0.directories.values)).sorted() } ?? [])
    }

    /// A console log as the VMM keeps it (`RotatingLog`): the previous file, if it started
    /// over, then the current one; nil when there is none.
    static func consoleLog(_ path: String) -> Data? {
        guard let current = FileManager.default.contents(atPath: path) else { return nil }
        return (FileManager.default.contents(atPath: path + ".1") ?? Data()) + current
    }

    static func vmmBinary() throws -> String {
        guard let b = VMMProcess.binary() else {
            throw MicroVMError.notFound("mvm-vmm, the direct mode's VMM, was not found next to mvm: build it (swift build -c release --product mvm-vmm --static-swift-stdlib) or set MVM_VMM to its path")
        }
        return b
    }

    /// The plan in an `mvm-vmm` process: the tap made here (persistent, so the VMM attaches to it
    /// by name) and removed after; the VMM's pid and API socket in the instance's record.
    func executeInVMMProcess(_ plan: LaunchPlan, kernel: String, binary: String, record: DirectInstanceRecord,
                             records: InstanceRecords, logPath: String, cgroups: [String]) async throws -> RunResult {
        let spec = plan.spec
        // Made persistent and let go of: a tap takes one process at a time, and the VMM attaches
        // to it by name.
        let link = try spec.net.map { try TapLink.open($0, owner: spec.name, persistent: true) }
        link?.tap.close()
        defer { link?.tap.remove() }
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        unlink(logPath + ".1")
        let config = VMMProcess.configuration(plan, kernel: kernel, tap: link?.tap.name)
        let directory = (logPath as NSString).deletingLastPathComponent
        let outcome = try await VMMProcess.run(
            binary: binary, configuration: config, directory: directory, name: spec.name, logPath: logPath,
            apiSocket: record.apiSocket ?? directory + "/api.sock", cgroups: cgroups, devicePath: options.devicePath, allowEmulatedKVM: options.allowEmulatedKVM,
            timeout: spec.timeout, jailed: options.jail) { pid in
                plan.clock.mark(.spawned)
                plan.holder(pid, "mvm-vmm")
                var r = record
                r.vmmPID = pid
                r.vmmStart = ProcessIdentity.startTime(pid: pid)
                try? records.update(r)
            }
        if let t = outcome.milestones["firstInstruction"] { plan.clock.mark(.firstInstruction, at: t) }
        if let t = outcome.milestones["ready"] { plan.clock.mark(.ready, at: t) }
        let console = String(decoding: Self.consoleLog(logPath) ?? Data(), as: UTF8.self)
        guard let report = ConsoleParser.parse(console).report else {
            let tail = console.split(separator: "\n", omittingEmptySubsequences: false).suffix(15).joined(separator: "\n")
            let why = outcome.stderr.trimmingCharacters(in: .whitespacesAndNewlines)
            let code: MicroVMError.Code = outcome.timedOut ? .timeout : .guestError
            let when = outcome.timedOut ? " within \(Int(spec.timeout)) s" : ""
            throw MicroVMError(code, "the guest stopped without reporting a result\(when) (mvm-vmm exited with status \(outcome.status)\(why.isEmpty ? "" : ": " + why)); last console lines:\n\(tail)")
        }
        return plan.result(status: report.status, output: report.outputText, console: console)
    }

    /// The plan's enforcement as a cgroup of the instance's own, which the VMM process joins
    /// before it creates the VM: its guest memory, its threads and its own heap are all charged
    /// there, and the launching process stays outside (a bench runs several VMs at once).
    func enforce(_ plan: LaunchPlan) throws -> CgroupSet? {
        guard options.enforceInCgroup else { return nil }
        return try CgroupSet.create(name: Self.cgroupName(plan.name), slice: plan.enforcement.cgroupSlice)
    }

    static func cgroupName(_ instance: String) -> String { "microvm/direct-\(instance)" }

    public func list() async throws -> [InstanceInfo] {
        records.live().map { r in
            // A run that has not started its VMM yet is starting, and has no process of its own;
            // so is a VMM still building its machine (its API socket not bound yet: `mvm run -d`
            // returns when the instance answers). An unjailed VMM is a debugging run, and says so.
            let up = r.vmmPID != nil && (r.apiSocket.map { access($0, F_OK) == 0 } ?? true)
            return InstanceInfo(name: r.name, mode: .direct, state: up ? "running" : "starting", pid: r.vmmPID, cpus: r.cpus, memory: r.memory,
                         startedAt: r.startedAt, logPath: r.logPath, note: r.jailed == false ? "no jail" : nil)
        }
    }

    /// SIGTERM to the `mvm run` holding the VM (its handler gives the guest a Ctrl-Alt-Del and
    /// `VMMProcess.stopGrace` to reset, stops the VMM and cleans up), then SIGKILL after 10 s more.
    /// The `mvm run` then ends with status 143. A holder that runs other instances too (a bench,
    /// or this very process) must not be signalled, which would end them all: its VM is stopped
    /// through its VMM instead (`stopThroughVMM`).
    public func stop(name: String) async throws {
        let r = try running(name)
        if r.pid == getpid() || r.sharedHolder == true { return try await stopThroughVMM(r) }
        await Self.end(pid: r.pid, startTime: r.pidStart, grace: VMMProcess.stopGrace + 10)
        // A run that could not clean up after itself: its tap and cgroup go with its record.
        records.removeStale(name)
    }

    /// A VM whose holder runs other instances too. Its VMM gets what the holder's own stop would
    /// give it: a Ctrl-Alt-Del and `VMMProcess.stopGrace` to reset, then a SIGTERM (the VMM stops
    /// the VM and exits), then a SIGKILL 10 s later. The holder sees its VMM end and cleans up as
    /// after any end; this returns once it has, so `mvm ps` no longer lists the instance.
    func stopThroughVMM(_ r: DirectInstanceRecord) async throws {
        guard let vmm = r.vmmPID, let start = r.vmmStart else {
            throw MicroVMError(.backend, "direct instance '\(r.name)' is still starting: stop it once `mvm ps` lists it as running")
        }
        let pressed = r.apiSocket.map { VMMProcess.pressCtrlAltDel(apiSocket: $0) } ?? false
        let reset = pressed ? await Self.waitUntil(within: VMMProcess.stopGrace) { !ProcessIdentity.isAlive(pid: vmm, startTime: start) } : false
        if !reset { await Self.end(pid: vmm, startTime: start, grace: 10) }
        _ = await Self.waitUntil(within: 10) { !records.live().contains { $0.name == r.name && $0.pid == r.pid } }
    }

    /// SIGTERM to the process (pid and start time, so a reused pid is never signalled), then
    /// SIGKILL if it outlives `grace`; returns once it is gone, or 5 s after the SIGKILL.
    static func end(pid: Int32, startTime: UInt64?, grace: Double) async {
        let gone = { !ProcessIdentity.isAlive(pid: pid, startTime: startTime) }
        if !gone() { kill(pid, SIGTERM) }
        guard !(await waitUntil(within: grace, gone)) else { return }
        kill(pid, SIGKILL)
        _ = await waitUntil(within: 5, gone)
    }

    /// Polls `done` every 50 ms for at most `seconds`; whether it came true.
    static func waitUntil(within seconds: Double, _ done: () -> Bool) async -> Bool {
        let deadline = Monotonic.seconds() + seconds
        while !done() && Monotonic.seconds() < deadline { try? await Task.sleep(for: .milliseconds(50)) }
        return done()
    }

    /// This host's direct-instance records.
    var records: InstanceRecords { InstanceRecords(directory: options.paths.instances + "/direct") }

    /// The record of a running direct instance, or an error naming it.
    func running(_ name: String) throws -> DirectInstanceRecord {
        guard let r = records.live().first(where: { $0.name == name }) else {
            throw MicroVMError.notFound("no running direct instance named '\(name)': see mvm ps")
        }
        return r
    }

    /// The VMM's API socket of a running instance, or an error that says why there is none.
    func api(_ name: String) throws -> APIClient {
        let r = try running(name)
        guard let socket = r.apiSocket else {
            throw MicroVMError.unsupported("direct instance '\(name)' runs inside its mvm process, which serves no API")
        }
        return APIClient(socketPath: socket)
    }

    func call(_ name: String, _ method: String, _ path: String, body: String? = nil) throws -> String {
        let r: APIClient.Response
        do { r = try api(name).send(method, path, body: body) } catch let e as APIClient.ClientError {
            throw MicroVMError(.backend, "direct instance '\(name)': \(e)")
        }
        guard (200..<300).contains(r.status) else {
            throw MicroVMError(.invalidArgument, "direct instance '\(name)': \(r.faultMessage ?? "the VMM answered \(r.status)")")
        }
        return r.body
    }

    /// A direct VM's vCPU count is fixed at launch (no CPU hotplug); its memory moves through its
    /// balloon (`--balloon`), up to what it booted with; its weight and quota change in its cgroup.
    public func checkUpdate(name: String, from: Enforcement, to: Enforcement) throws {
        if from.cpus != to.cpus {
            throw MicroVMError.unsupported("a running direct VM keeps its vCPU count (\(from.cpus)): --weight, --quota and, with a balloon, --memory change live; restart it for more vCPUs")
        }
        guard from.memory != to.memory else { return }
        try BalloonResize.check("direct instance '\(name)'", boot: try running(name).bootMemory, from: from.memory, to: to.memory, minimum: .mebibytes(32))
    }

    /// Memory first through the balloon: a smaller guest fills its balloon (its pages go back to
    /// the host) before the cgroup's limit falls; a larger one gets the limit first, then its
    /// pages back. A guest that does not fill its balloon in time (`BalloonResize.grace`) is given back
    /// what it had, and nothing changes.
    public func update(name: String, from: Enforcement, to: Enforcement) async throws {
        try checkUpdate(name: name, from: from, to: to)
        var r = try running(name)
        let cgroup = try r.cgroup.map { try CgroupSet.existing(name: $0) }
        func limits(_ e: Enforcement) throws {
            guard let cgroup else { return }
            do { try cgroup.update(slice: e.cgroupSlice) } catch {
                try? cgroup.update(slice: from.cgroupSlice)
                throw error
            }
        }
        guard from.memory != to.memory, let boot = r.bootMemory else { return try limits(to) }
        if to.memory > from.memory { try limits(to) }
        do {
            let api = try api(name)
            try await offload { try BalloonResize.run(name, api: api, boot: boot, from: from.memory, to: to.memory) }
        } catch {
            if to.memory > from.memory, let cgroup { try? cgroup.update(slice: from.cgroupSlice) }
            throw error
        }
        if to.memory < from.memory { try limits(to) }
        r.memory = to.memory
        try? records.update(r)
    }

    public func memoryUse(name: String) async throws -> GuestMemoryUse? {
        guard let boot = try running(name).bootMemory else { return nil }
        let body = try call(name, "GET", "/balloon/statistics")
        return try BalloonResize.use(boot: boot, statistics: body)
    }

    public func pause(name: String) async throws { _ = try call(name, "PATCH", "/vm", body: #"{"state": "Paused"}"#) }
    public func resume(name: String) async throws { _ = try call(name, "PATCH", "/vm", body: #"{"state": "Resumed"}"#) }
    public func stats(name: String) async throws -> String { try call(name, "GET", "/metrics") }

    /// Through the guest agent (`--vsock CID --vsock-shell`), over the host's vhost-vsock.
    public func exec(name: String, command: [String]) async throws -> (status: Int32, output: String) {
        try await GuestAgent.exec(cid: try await agentCID(name: name)!, command: command)
    }

    public func agentCID(name: String) async throws -> UInt32? {
        let r = try running(name)
        guard let cid = r.vsockCID, r.vsockShell == true else {
            throw MicroVMError.unsupported("direct instance '\(name)' has no agent: start it with --vsock CID --vsock-shell (needs /dev/vhost-vsock) to use mvm exec")
        }
        return cid
    }

    /// How many ended runs keep their console log for `mvm logs NAME`.
    public static let keptEndedRuns = 32

    /// An ended run keeps its instance directory (its console log) for `mvm logs`; the
    /// directories of ended runs beyond the newest `keep`, by their log's last write, go, so a
    /// host that runs many VMs is not left with one directory per run. A directory whose name a
    /// live record holds is never touched.
    func pruneEndedRuns(keep: Int = Self.keptEndedRuns) {
        let root = options.paths.instances
        let live = Set(records.live().map(\.name))
        let ended: [(path: String, written: Int)] = ((try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []).compactMap { name in
            var st = stat()
            guard !live.contains(name), stat(root + "/" + name + "/console.log", &st) == 0 else { return nil }
            return (root + "/" + name, st.st_mtim.tv_sec * 1_000_000_000 + st.st_mtim.tv_nsec)
        }
        for old in ended.sorted(by: { $0.written > $1.written }).dropFirst(keep) { try? FileManager.default.removeItem(atPath: old.path) }
    }

    public func logs(name: String) async throws -> String {
        let path = options.paths.instances + "/" + name + "/console.log"
        guard let d = Self.consoleLog(path) else {
            throw MicroVMError.notFound("no console log for direct instance '\(name)' (looked in \(path))")
        }
        return String(decoding: d, as: UTF8.self)
    }
}
