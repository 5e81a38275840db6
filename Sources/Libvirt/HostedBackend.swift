import CLibvirt
import CLazyLibs
import Foundation
import Host
import Images
import Launch
import Allocator
import MicroVMCore
import VMMAPI
#if canImport(Glibc)
import Glibc
#endif

/// `mvm run --mode hosted`: a transient libvirt domain per run, booted straight into the default
/// image's kernel, followed through its serial log until the guest init reports its result.
///
/// The default connection is libvirt's embedded QEMU driver: no daemon. One process at a time
/// may hold a root, and a process one root, so each process gets a root of its own under
/// `Paths.libvirtRoot` (`EmbeddedRoots`), and hosted runs in different processes go side by side.
public struct HostedBackend: InstanceBackend {
    public var mode: RunMode { .hosted }
    /// The libvirt URI (already expanded: `qemu:///embed` gets its root).
    public var uri: String
    public var paths: Paths
    /// Attach the image's rootfs disk as /dev/vda so the command runs chrooted in it.
    public var attachRootfs: Bool
    /// Seconds a guest gets to power itself off (or answer an ACPI shutdown) before it is destroyed.
    public var shutdownTimeout: Double
    public var image: @Sendable () throws -> GuestImage

    public init(connect: String? = nil, paths: Paths = .default, attachRootfs: Bool = true,
                shutdownTimeout: Double = 10, image: (@Sendable () throws -> GuestImage)? = nil) {
        self.paths = paths
        self.uri = Self.expand(connect ?? "qemu:///embed", paths: paths)
        self.attachRootfs = attachRootfs
        self.shutdownTimeout = shutdownTimeout
        self.image = image ?? { try ImageStore(paths: paths).ensureDefault() }
    }

    /// `qemu:///embed` without a root means this process's own root under the state directory.
    public static func expand(_ uri: String, paths: Paths) -> String {
        uri == "qemu:///embed" ? "qemu:///embed?root=\(EmbeddedRoots.own(paths))" : uri
    }

    /// The embedded driver's root directory named by the URI, if it is an embedded URI.
    public var embeddedRoot: String? {
        guard uri.hasPrefix("qemu:///embed"), let c = URLComponents(string: uri) else { return nil }
        return c.queryItems?.first { $0.name == "root" }?.value
    }

    // MARK: Connection

    /// The connection for this backend's URI, opened once per process and shared: the embedded
    /// driver can be initialised once per process, and its root locked by one process only.
    public func connection() throws -> LibvirtConnection {
        // Installed is not always loadable (a missing dependency): say so rather than abort.
        guard mvm_lazy_available(0) != 0 else {
            throw MicroVMError.notFound("libvirt.so.0 is installed but cannot be loaded (a library it needs is missing): apt-get install --reinstall libvirt0 libvirt-daemon-driver-qemu")
        }
        if let root = embeddedRoot {
            try Self.prepareEmbeddedRoot(root)
            if root == EmbeddedRoots.own(paths) { try EmbeddedRoots.adopt(root, paths: paths) }
        }
        return try ConnectionCache.shared.connection(uri)
    }

    /// The embedded driver reads `etc/qemu.conf` under its root. `stdio_handler = "file"` makes it
    /// write QEMU's log and our serial file itself instead of asking virtlogd, which needs a daemon.
    /// Inside the nested rig (a chroot over 9p, `MVM_IN_RIG=1`) libvirt cannot build QEMU's private
    /// /dev, so there QEMU shares the rig's /dev (`namespaces = []`).
    static func prepareEmbeddedRoot(_ root: String, inRig: Bool = RigEnvironment.isInside) throws {
        try Paths.ensureDirectory(root + "/etc")
        let conf = root + "/etc/qemu.conf"
        let want = qemuConf(inRig: inRig)
        if (try? String(contentsOfFile: conf, encoding: .utf8)) != want {
            do { try want.write(toFile: conf, atomically: true, encoding: .utf8) }
            catch { throw MicroVMError(.permissionDenied, "cannot write \(conf): make the state directory writable or set MVM_STATE_DIR", cause: error) }
        }
    }

    static func qemuConf(inRig: Bool) -> String {
        "# written by MicroVM: no virtlogd without a daemon\nstdio_handler = \"file\"\n"
            + (inRig ? "# inside the nested rig: no private /dev for QEMU (the rig's is a chroot's devtmpfs)\nnamespaces = []\n" : "")
    }

    // MARK: Run

    public func attachesRootfs(to spec: VMSpec) -> Bool { attachRootfs }

    /// libvirt is loaded on first use: a host without it gets this error, not an abort.
    public func checkHost() throws {
        guard mvm_lazy_installed(0) != 0 else {
            throw MicroVMError.notFound("hosted mode needs libvirt (libvirt.so.0), which is not installed: apt-get install libvirt0 libvirt-daemon-driver-qemu")
        }
        // Its 50-odd libraries (some 15 ms) load when the backend connects, after the grant.
    }
    public func defaultArtifacts() throws -> BootArtifacts? { try image().artifacts }

    public func execute(_ launch: LaunchPlan) async throws -> RunResult {
        var spec = launch.spec
        try DomainXML.checkName(spec.name)
        let conn = try connection()
        // A local QEMU gets a tap made here, as the direct VMM does; it persists (QEMU opens it
        // by name once this process lets go of it) until the run ends, when it is removed. Its
        // name is in the instance's record before it exists: a killed run's tap is found there.
        var link: TapLink?
        defer { link?.tap.remove() }
        let wantedNet = isLocal ? spec.net : nil
        let plannedTap = wantedNet.map { TapLink.plannedTap($0, owner: spec.name) }
        if let plannedTap { spec.net?.tap = plannedTap.name }
        let plan = try makePlan(launch, spec: spec, connection: conn)
        try Paths.ensureDirectory(recordDirectory)
        try Paths.ensureDirectory((plan.runDirectory as NSString).deletingLastPathComponent)
        guard mkdir(plan.runDirectory, 0o755) == 0 else {
            if errno == EEXIST {
                throw MicroVMError.invalidArgument("a hosted instance named '\(spec.name)' already exists (\(plan.runDirectory)): pick another --name or mvm stop it")
            }
            throw MicroVMError(.permissionDenied, "cannot create \(plan.runDirectory): \(String(cString: strerror(errno)))")
        }
        var record = HostedRecord(name: spec.name, uri: uri, logPath: plan.config.consoleLog, runDirectory: plan.runDirectory,
                                  startedAt: Date(), cpus: spec.cpus, memory: spec.memory, ownerPID: getpid(),
                                  blockDevices: plan.config.disks.indices.map(DomainXML.diskName), taps: plan.config.taps)
        record.ownTaps = plannedTap.flatMap { $0.creates ? [$0.name] : nil }
        if spec.vsockShell { record.agentCID = spec.vsockCID }
        var domain: LibvirtDomain?
        var watch: LifecycleWatch?
        var api: APIServer?
        defer { api?.stop() }
        do {
            _ = FileManager.default.createFile(atPath: plan.config.consoleLog, contents: nil)
            try record.save(in: recordDirectory)
            if let wantedNet {
                let l = try TapLink.open(wantedNet, owner: spec.name, persistent: true)
                l.tap.close()
                link = l
            }
            let (d, config) = try createDomain(plan.config, connection: conn)
            let qemu = isLocal ? qemuPid(name: spec.name) : nil
            if let qemu { launch.holder(qemu, "qemu") }
            if isLocal, !config.memoryHardLimit {
                let pid = qemu
                do { try Self.limitMemory(of: pid, to: launch.enforcement.memoryLimit) } catch where !(pid.map { ProcessIdentity.isAlive(pid: $0, startTime: nil) } ?? false) {
                    // QEMU ended before its limit could be set: following the domain reports how.
                }
            }
            launch.clock.mark(.spawned)
            launch.clock.mark(.firstInstruction)
            domain = d
            record.machine = config.machine
            record.maxCPUs = config.maxVCPUs
            // The domain's control API, served by this process (the only one that can reach an
            // embedded driver's domain) until the run ends.
            let socket = plan.runDirectory + "/api.sock"
            var vmConfig = VMConfiguration(machineConfig: MachineConfig(vcpuCount: spec.cpus, memSizeMib: Int(spec.memory.bytes >> 20)))
            if let b = spec.balloon {
                vmConfig.balloon = Balloon(amountMib: Int(b.amount.bytes >> 20), deflateOnOom: b.deflateOnOOM,
                                           statsPollingIntervalS: b.statsInterval, freePageReporting: b.freePageReporting)
                record.bootMemory = spec.memory
                record.memory = spec.memory - b.amount
            }
            let controller = HostedController(domain: d, boot: spec.memory, balloon: spec.balloon?.amount,
                                              maxVCPUs: config.maxVCPUs ?? spec.cpus, qemuPid: qemu)
            let router = APIRouter(controller: controller,
                                   instanceID: spec.name, vmmVersion: "libvirt", configuration: vmConfig)
            let server = APIServer(socketPath: socket, router: router)
            try server.start()
            api = server
            record.apiSocket = socket
            try record.save(in: recordDirectory)
            let stopped = StopFlag()
            watch = try d.watchLifecycle { event, _ in
                if event == Int32(VIR_DOMAIN_EVENT_STOPPED.rawValue) || event == Int32(VIR_DOMAIN_EVENT_CRASHED.rawValue) { stopped.set() }
            }
            let outcome = try await follow(domain: d, log: config.consoleLog, clock: launch.clock, timeout: spec.timeout, stopped: stopped)
            try await finish(domain: d, stopped: stopped)
            watch?.cancel()
            let console = (try? String(contentsOfFile: config.consoleLog, encoding: .utf8)) ?? outcome.console
            removeRunFiles(record)
            return launch.result(status: outcome.report.status, output: outcome.report.outputText, console: console)
        } catch {
            if let domain { try? domain.destroy() }
            watch?.cancel()
            removeRunFiles(record)
            throw error
        }
    }

    struct Plan {
        var config: DomainConfig
        var runDirectory: String
    }

    /// The launch plan against the host and the connection: a domain config. The rootfs the plan
    /// attaches is the shared image: read-only to QEMU, not relabelled by libvirt (the init mounts
    /// it read-only, `mvm.ro` on the plan's command line).
    func makePlan(_ launch: LaunchPlan, spec: VMSpec, connection conn: LibvirtConnection) throws -> Plan {
        let runDirectory = paths.libvirtRoot + "/runs/" + spec.name
        guard let kernel = launch.kernel else { throw MicroVMError(.internalError, "a hosted launch plan has no kernel") }
        var disks: [DomainConfig.Disk] = launch.disks.map { .init(path: $0.path, readOnly: $0.readOnly, direct: $0.direct) }
        if launch.rootfsAttached { disks[0].relabel = false }
        var taps: [String] = []
        if let net = spec.net {
            guard let tap = net.tap else {
                throw MicroVMError.invalidArgument("hosted mode attaches an existing tap device: give the network a tap name")
            }
            taps.append(tap)
        }
        let accel = accelerator(connection: conn)
        var config = DomainConfig(name: spec.name, memory: spec.memory, vcpus: spec.cpus, accelerator: accel,
                                  machine: MachineChoice.shared.preferred(for: conn, accelerator: accel),
                                  kernel: kernel, initrd: launch.initrd, cmdline: launch.cmdline,
                                  disks: disks, taps: taps, consoleLog: runDirectory + "/console.log", enforcement: launch.enforcement,
                                  memoryHardLimit: isLocal ? Self.canRaiseMemlockLimit() : true)
        config.vsockCID = spec.vsockCID
        config.balloon = spec.balloon
        if let max = spec.maxCPUs, max > spec.cpus {
            // vCPUs are plugged into slots ACPI describes; microvm has neither.
            config.maxVCPUs = max
            config.machine = "pc"
        }
        return Plan(config: config, runDirectory: runDirectory)
    }

    var isLocal: Bool { !uri.contains("://") || URLComponents(string: uri)?.host.map(\.isEmpty) ?? true }

    /// KVM only where this host really has it; everything else is TCG, said out loud once.
    func accelerator(connection conn: LibvirtConnection) -> DomainConfig.Accelerator {
        if !isLocal {
            return conn.domainCapabilities(machine: "pc", virtType: "kvm") != nil ? .kvm : .qemu
        }
        let kvm = HostProfile.kvm(paths: paths)
        if kvm.verdict == .hardware { return .kvm }
        Warnings.once("hosted mode runs QEMU under TCG emulation here (KVM: \(kvm.reason)); its timings are emulation timings")
        return .qemu
    }

    /// Where libvirt may not take `<memtune>` (no CAP_SYS_RESOURCE), the enforcement's memory
    /// limit is written into the memory cgroup libvirt made for the domain (QEMU's, from
    /// /proc/PID/cgroup; its per-thread subgroups' parent), so the grant holds all the same.
    static func limitMemory(of pid: Int32?, to limit: ByteCount) throws {
        guard let pid, FileManager.default.fileExists(atPath: "/proc/\(pid)/cgroup") else {
            throw MicroVMError(.backend, "cannot find QEMU's cgroup to limit its memory: the domain has no QEMU process")
        }
        try setMemoryLimit(of: pid, to: limit)
    }

    /// `<memtune><hard_limit>` makes libvirt raise QEMU's RLIMIT_MEMLOCK, which needs CAP_SYS_RESOURCE.
    static func canRaiseMemlockLimit(status: String? = readWholeText("/proc/self/status")) -> Bool {
        guard let line = status?.split(separator: "\n").first(where: { $0.hasPrefix("CapEff:") }),
              let caps = UInt64(line.dropFirst("CapEff:".count).trimmingCharacters(in: .whitespaces), radix: 16) else { return false }
        return caps & (1 << 24) != 0
    }

    /// Starts the domain; a machine type libvirt turns down falls back to `pc` (remembered).
    func createDomain(_ config: DomainConfig, connection conn: LibvirtConnection) throws -> (LibvirtDomain, DomainConfig) {
        let xml = try DomainXML.document(for: config)
        do {
            return (try Self.createRetryingCgroupRace(xml, connection: conn), config)
        } catch let e as MicroVMError where config.machine != "pc" {
            // libvirt may list a machine in its capabilities yet refuse it with our devices
            // (9.0 lists microvm but wants PCI for virtio); `pc` working proves the machine was the problem.
            var fallback = config
            fallback.machine = "pc"
            let d = try Self.createRetryingCgroupRace(DomainXML.document(for: fallback), connection: conn)
            MachineChoice.shared.reject(config.machine, for: conn, reason: e.message)
            return (d, fallback)
        }
    }

    /// libvirt instances that share the host's `machine` cgroup (a daemon plus embedded drivers)
    /// race while one creates and another removes its directories; the loser fails once with a
    /// cgroup write error and succeeds when asked again.
    static func createRetryingCgroupRace(_ xml: String, connection conn: LibvirtConnection) throws -> LibvirtDomain {
        do { return try conn.createTransient(xml: xml) }
        catch let e as MicroVMError where e.message.contains("/sys/fs/cgroup") {
            usleep(300_000)
            return try conn.createTransient(xml: xml)
        }
    }

    struct Outcome {
        var report: GuestReport
        var console: String
    }

    /// Tails the serial log until the framed result arrives, the domain stops, or time runs out;
    /// marks `ready` on the clock when the init's boot-complete arrives (read every 5 ms).
    func follow(domain: LibvirtDomain, log: String, clock: LaunchClock, timeout: Double, stopped: StopFlag) async throws -> Outcome {
        let start = Monotonic.seconds()
        guard let handle = FileHandle(forReadingAtPath: log) else {
            throw MicroVMError(.backend, "cannot read the serial log \(log)")
        }
        defer { try? handle.close() }
        var parser = ConsoleParser()
        // The newest 4 MiB of the console (up to twice that between trims): a guest that floods
        // its console costs a bounded amount of memory and copying.
        var console = Data()
        let keep = 4 << 20
        var lastStateCheck = start
        while true {
            // Checked on every round, not only when the guest is quiet: a guest that prints
            // without pause still ends at its time-out.
            if Monotonic.seconds() - start > timeout {
                throw MicroVMError(.timeout, "the hosted guest '\(domain.name)' gave no result within \(Int(timeout)) s and was destroyed: raise --timeout, or see its console with a longer run")
            }
            if Task.isCancelled { throw CancellationError() }
            let chunk = handle.availableData
            if !chunk.isEmpty {
                console.append(chunk)
                if console.count > 2 * keep { console.removeFirst(console.count - keep) }
                parser.feed(chunk)
                if parser.bootComplete { clock.mark(.ready) }
                if let report = parser.report {
                    return Outcome(report: report, console: String(decoding: console.suffix(keep), as: UTF8.self))
                }
                continue
            }
            var gone = stopped.isSet
            if !gone, Monotonic.seconds() - lastStateCheck > 0.5 {
                lastStateCheck = Monotonic.seconds()
                gone = !domain.state().isActive
            }
            if gone {
                // The last bytes may have landed after the previous read (to the end: on a
                // file `availableData` returns one block).
                parser.feed((try? handle.readToEnd()) ?? Data())
                if let report = parser.report {
                    return Outcome(report: report, console: String(decoding: console.suffix(keep), as: UTF8.self))
                }
                let tail = String(String(decoding: console.suffix(8192), as: UTF8.self).suffix(1500))
                let qemu = qemuLogTail(domain: domain.name)
                throw MicroVMError(.guestError, "the hosted guest '\(domain.name)' stopped before it reported a result (\(parser.bootComplete ? "after" : "before") boot completed); QEMU was killed or the guest crashed. Console tail:\n\(tail)\(qemu.isEmpty ? "" : "\nQEMU's log ends:\n\(qemu)")")
            }
            try? await Task.sleep(for: .milliseconds(5))
        }
    }

    /// The last lines libvirt logged for the domain's QEMU (its exit reason, when QEMU gave one),
    /// for the local drivers whose log directory is known; empty otherwise.
    func qemuLogTail(domain: String, lines: Int = 6) -> String {
        let dir: String
        if let root = embeddedRoot { dir = root + "/log/qemu" }
        else if uri == "qemu:///system" { dir = "/var/log/libvirt/qemu" }
        else { return "" }
        // Only its end is read: the embedded driver appends every run of a name to one file.
        guard let h = FileHandle(forReadingAtPath: "\(dir)/\(domain).log") else { return "" }
        defer { try? h.close() }
        let size = (try? h.seekToEnd()) ?? 0
        try? h.seek(toOffset: size > 16_384 ? size - 16_384 : 0)
        let text = String(decoding: (try? h.readToEnd()) ?? Data(), as: UTF8.self)
        return text.split(separator: "\n").suffix(lines).map { String($0.prefix(300)) }.joined(separator: "\n")
    }

    /// After the result the guest powers itself off (reboot → on_reboot destroy). Waits for that,
    /// then asks politely, then pulls the plug.
    func finish(domain: LibvirtDomain, stopped: StopFlag) async throws {
        if await waitStopped(domain, stopped, seconds: shutdownTimeout / 2) { return }
        try? domain.shutdown()
        if await waitStopped(domain, stopped, seconds: shutdownTimeout / 2) { return }
        try domain.destroy()
    }

    func waitStopped(_ domain: LibvirtDomain, _ stopped: StopFlag, seconds: Double) async -> Bool {
        let deadline = Monotonic.seconds() + seconds
        while Monotonic.seconds() < deadline {
            if stopped.isSet || !domain.state().isActive { return true }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return stopped.isSet || !domain.state().isActive
    }

    /// What a run killed before its cleanup left: its taps, its run files.
    func removeLeftovers(_ record: HostedRecord) {
        (record.ownTaps ?? []).forEach(TapDevice.delete)
        removeRunFiles(record)
        EmbeddedRoots.sweep(paths)
    }

    func removeRunFiles(_ record: HostedRecord) {
        try? FileManager.default.removeItem(atPath: record.runDirectory)
        try? FileManager.default.removeItem(atPath: HostedRecord.file(record.name, in: recordDirectory))
    }

    // MARK: ps, stop, logs, stats

    var recordDirectory: String { paths.instances + "/hosted" }

    public func list() async throws -> [InstanceInfo] {
        defer { EmbeddedRoots.sweep(paths) }
        return HostedRecord.all(in: recordDirectory).compactMap { r in
            let pid = qemuPid(record: r)
            let ownerAlive = kill(r.ownerPID, 0) == 0
            if pid == nil && !ownerAlive {
                // The run that owned it is gone and so is QEMU: a leftover from a killed mvm.
                removeLeftovers(r)
                return nil
            }
            // Running once libvirt has finished starting the domain (its machine is recorded then):
            // QEMU's pid comes earlier, before libvirt writes the domain's cgroup limits.
            return InstanceInfo(name: r.name, mode: .hosted, state: pid == nil || r.machine == nil ? "starting" : "running", pid: pid,
                                cpus: r.cpus, memory: r.memory, startedAt: r.startedAt, logPath: r.logPath)
        }
    }

    public func stop(name: String) async throws {
        guard let r = HostedRecord.load(name, in: recordDirectory) else {
            throw MicroVMError.notFound("no hosted instance named '\(name)': see mvm ps")
        }
        if r.ownerPID == getpid() || kill(r.ownerPID, 0) != 0 {
            do {
                let conn = try ConnectionCache.shared.connection(r.uri)
                if let d = try conn.lookup(name: name) {
                    try? d.shutdown()
                    if !(await waitStopped(d, StopFlag(), seconds: shutdownTimeout)) { try d.destroy() }
                }
            } catch where r.ownerPID != getpid() {
                // The dead run's root cannot be opened here (this process holds another): its
                // QEMU is ended as a live run's is, by signal.
                if let pid = qemuPid(record: r) { await terminate(pid) }
            }
            if r.ownerPID != getpid() { removeLeftovers(r) }
            return
        }
        // Another mvm owns the run (and, for the embedded driver, the root's lock): stop its
        // QEMU; that run sees the domain go and cleans up after itself.
        guard let pid = qemuPid(record: r) else {
            throw MicroVMError(.backend, "hosted instance '\(name)' has no QEMU process yet: try again in a moment")
        }
        await terminate(pid)
        // Returns once the owning run has cleaned up (its record and run directory gone), so the
        // name is free for the next `mvm run`; a run that died meanwhile leaves them to us.
        let cleaned = Monotonic.seconds() + 15
        while HostedRecord.load(name, in: recordDirectory) != nil {
            if kill(r.ownerPID, 0) != 0 { removeLeftovers(r); break }
            if Monotonic.seconds() > cleaned { break }
            try? await Task.sleep(for: .milliseconds(50))
        }
    }

    /// SIGTERM to a QEMU, and SIGKILL if it is still there after the shutdown time.
    func terminate(_ pid: Int32) async {
        kill(pid, SIGTERM)
        let deadline = Monotonic.seconds() + shutdownTimeout
        while Monotonic.seconds() < deadline, kill(pid, 0) == 0 { try? await Task.sleep(for: .milliseconds(50)) }
        if kill(pid, 0) == 0 { kill(pid, SIGKILL) }
    }

    public func logs(name: String) async throws -> String {
        guard let r = HostedRecord.load(name, in: recordDirectory) else {
            throw MicroVMError.notFound("no hosted instance named '\(name)': logs are kept while it runs (a finished run returns its console)")
        }
        return (try? String(contentsOfFile: r.logPath, encoding: .utf8)) ?? ""
    }

    /// CPU time, memory and I/O counters of a running hosted instance, for the benchmark.
    public func domainStats(name: String) throws -> DomainStats {
        let r = HostedRecord.load(name, in: recordDirectory)
        let conn = try ConnectionCache.shared.connection(r?.uri ?? uri)
        guard let d = try conn.lookup(name: name) else {
            throw MicroVMError.notFound("no running hosted domain named '\(name)' on \(conn.uri)")
        }
        return try d.stats(blockDevices: r?.blockDevices ?? ["vda"], interfaces: r?.taps ?? [])
    }

    /// A running hosted VM's vCPUs are plugged in and out (libvirt's live `setVcpus`) within the
    /// slots it booted with (`mvm run --max-cpus`); its memory moves through its balloon
    /// (`--balloon`), up to what it booted with; its CPU weight and quota change in the cgroup
    /// libvirt made for the domain.
    public func checkUpdate(name: String, from: Enforcement, to: Enforcement) throws {
        let r = HostedRecord.load(name, in: recordDirectory)
        if from.cpus != to.cpus {
            let slots = r?.maxCPUs ?? from.cpus
            guard r?.apiSocket != nil, to.cpus <= slots else {
                throw MicroVMError.unsupported("hosted instance '\(name)' booted with room for \(slots) vCPU\(slots == 1 ? "" : "s"): run it with --max-cpus \(to.cpus) (or more) to give it \(to.cpus) while it runs; --weight, --quota and, with a balloon, --memory change live")
            }
        }
        guard from.memory != to.memory else { return }
        try BalloonResize.check("hosted instance '\(name)'", boot: r?.apiSocket != nil ? r?.bootMemory : nil, from: from.memory, to: to.memory,
                                minimum: .mebibytes(64))
    }

    /// The domain's CPU weight and quota, written where libvirt's `<cputune>` put them (the
    /// domain's own cgroup, above its per-thread groups), with vCPUs plugged in after the quota
    /// grows or taken out before it falls, and repinned to a dedicated grant's CPUs; memory
    /// through the balloon, filled before the domain's memory limit falls, or given the limit
    /// first when it grows.
    public func update(name: String, from: Enforcement, to: Enforcement) async throws {
        try checkUpdate(name: name, from: from, to: to)
        guard let pid = qemuPid(name: name) else {
            throw MicroVMError.notFound("no running QEMU for hosted instance '\(name)': see mvm ps")
        }
        let dirs = Self.domainCgroups(of: pid)
        func cpuFiles(_ e: Enforcement) -> [(file: String, value: String)] {
            if let cpu = dirs["cpu"] { return CgroupSet.cpuFiles(cpu, unified: false, slice: e.cgroupSlice) }
            return dirs["unified"].map { CgroupSet.cpuFiles($0, unified: true, slice: e.cgroupSlice) } ?? []
        }
        let writes = cpuFiles(to)
        if writes.isEmpty {
            // libvirt without cgroups (as in the nested rig) enforced no <cputune> at launch either.
            guard dirs.isEmpty, from.cpuWeight == to.cpuWeight, from.cpus != to.cpus else {
                throw MicroVMError(.backend, "QEMU (pid \(pid)) of '\(name)' is in no cpu cgroup of libvirt's: its weight and quota cannot be changed")
            }
            Warnings.once("libvirt put QEMU in no cgroup here: the vCPU count changes, the CPU quota is not enforced (nor was it at launch)")
        }
        var r = HostedRecord.load(name, in: recordDirectory)
        if to.cpus > from.cpus { for (file, value) in writes { try Self.write(value, to: file) } }
        if to.cpus != from.cpus, let socket = r?.apiSocket {
            // A guest may take a minute to let go of a vCPU under emulation (HostedController.unplugWait).
            let api = APIClient(socketPath: socket, timeout: 90)
            do {
                try await offload {
                    do { try api.setVCPUCount(to.cpus) } catch { throw MicroVMError(.backend, "hosted instance '\(name)': \(error)") }
                }
            } catch {
                if to.cpus > from.cpus { for (file, value) in cpuFiles(from) { try? Self.write(value, to: file) } }
                throw error
            }
            r?.cpus = to.cpus
            try? r?.save(in: recordDirectory)
        }
        if to.cpus <= from.cpus { for (file, value) in writes { try Self.write(value, to: file) } }
        if !to.vcpuPins.isEmpty, to.vcpuPins != from.vcpuPins || to.cpus != from.cpus {
            try Self.repin(pid: pid, vcpus: to.cpus, pins: to.vcpuPins, emulator: to.cpuSet, cgroups: dirs)
        }
        guard from.memory != to.memory, var r, let boot = r.bootMemory, let socket = r.apiSocket else { return }
        if to.memory > from.memory { try Self.setMemoryLimit(of: pid, to: to.memoryLimit) }
        do {
            let api = APIClient(socketPath: socket)
            try await offload { try BalloonResize.run(name, api: api, boot: boot, from: from.memory, to: to.memory) }
        } catch {
            if to.memory > from.memory { try? Self.setMemoryLimit(of: pid, to: from.memoryLimit) }
            throw error
        }
        if to.memory < from.memory { try Self.setMemoryLimit(of: pid, to: to.memoryLimit) }
        r.memory = to.memory
        try? r.save(in: recordDirectory)
    }

    /// Moves vCPU `v` onto `pins[v % pins.count]` and QEMU's other threads onto `emulator`, as
    /// `<vcpupin>` and `<emulatorpin>` placed them at launch: the cpuset of libvirt's per-vCPU
    /// cgroup where there is one, and the thread's own affinity (QEMU names its vCPU threads
    /// "CPU N/KVM" or "CPU N/TCG").
    static func repin(pid: Int32, vcpus: Int, pins: [[Int]], emulator: [Int], cgroups dirs: [String: String]) throws {
        let cpusetDir = dirs["cpuset"] ?? dirs["unified"]
        func place(_ group: String, _ cpus: [Int]) throws {
            guard let cpusetDir, !cpus.isEmpty else { return }
            let file = cpusetDir + "/" + group + "/cpuset.cpus"
            if FileManager.default.fileExists(atPath: file) { try write(CPUList.format(cpus), to: file) }
        }
        for v in 0..<vcpus { try place("vcpu\(v)", pins[v % pins.count]) }
        try place("emulator", emulator)
        for thread in qemuThreads(of: pid) {
            if let v = thread.vcpu {
                if v < vcpus { try ThreadAffinity.pin(thread: thread.tid, to: pins[v % pins.count]) }
            } else if !emulator.isEmpty {
                try? ThreadAffinity.pin(thread: thread.tid, to: emulator)
            }
        }
    }

    /// QEMU's threads, with the vCPU each runs where it runs one (QEMU names those "CPU N/KVM"
    /// or "CPU N/TCG").
    static func qemuThreads(of pid: Int32) -> [(tid: Int32, vcpu: Int?)] {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
        return tasks.compactMap { task in
            guard let tid = Int32(task), let comm = readWholeText("/proc/\(pid)/task/\(task)/comm") else { return nil }
            return (tid, comm.hasPrefix("CPU ") ? Int(comm.dropFirst(4).prefix { $0.isNumber }) : nil)
        }
    }

    /// The domain's memory limit (libvirt's `<memtune>` hard limit, and its swap limit where
    /// libvirt set one), in the order cgroup v1 accepts: the swap limit is never below the other.
    static func setMemoryLimit(of pid: Int32, to limit: ByteCount) throws {
        let dirs = domainCgroups(of: pid)
        if let unified = dirs["unified"] {
            try write("\(limit.bytes)", to: unified + "/memory.max")
            return
        }
        guard let memory = dirs["memory"] else {
            throw MicroVMError(.backend, "QEMU (pid \(pid)) is in no memory cgroup of libvirt's: its memory limit cannot be changed")
        }
        let plain = memory + "/memory.limit_in_bytes", swap = memory + "/memory.memsw.limit_in_bytes"
        let current = (try? String(contentsOfFile: plain, encoding: .utf8)).flatMap { UInt64($0.trimmingCharacters(in: .whitespacesAndNewlines)) } ?? 0
        let swapSet = (try? String(contentsOfFile: swap, encoding: .utf8)).flatMap { UInt64($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
            .map { $0 < UInt64(Int64.max) / 2 } ?? false
        let order = limit.bytes > current ? [swap, plain] : [plain, swap]
        for file in order where file == plain || swapSet { try write("\(limit.bytes)", to: file) }
    }

    static func write(_ value: String, to file: String) throws {
        do { try value.write(toFile: file, atomically: false, encoding: .utf8) }
        catch { throw MicroVMError(.backend, "cannot write \(value) to \(file)", cause: error) }
    }

    public func memoryUse(name: String) async throws -> GuestMemoryUse? {
        guard let r = HostedRecord.load(name, in: recordDirectory), let boot = r.bootMemory, let socket = r.apiSocket else { return nil }
        let response: APIClient.Response
        do { response = try APIClient(socketPath: socket).send("GET", "/balloon/statistics") } catch { throw MicroVMError(.backend, "hosted instance '\(name)': \(error)") }
        guard response.status == 200 else { throw MicroVMError(.backend, "hosted instance '\(name)': \(response.faultMessage ?? "status \(response.status)")") }
        return try BalloonResize.use(boot: boot, statistics: response.body)
    }

    /// Through the guest agent (`--vsock CID --vsock-shell`: libvirt gives the
    /// domain a vhost-vsock device), as for direct VMs.
    public func exec(name: String, command: [String]) async throws -> (status: Int32, output: String) {
        try await GuestAgent.exec(cid: try await agentCID(name: name)!, command: command)
    }

    public func agentCID(name: String) async throws -> UInt32? {
        guard let r = HostedRecord.load(name, in: recordDirectory) else {
            throw MicroVMError.notFound("no hosted instance named '\(name)': see mvm ps")
        }
        guard let cid = r.agentCID else {
            throw MicroVMError.unsupported("hosted instance '\(name)' has no agent: start it with --vsock CID --vsock-shell (needs /dev/vhost-vsock) to use mvm exec")
        }
        return cid
    }

    /// Counters from the run's control API (libvirt's view of the domain and its balloon).
    public func stats(name: String) async throws -> String {
        guard let socket = HostedRecord.load(name, in: recordDirectory)?.apiSocket else {
            throw MicroVMError.notFound("no running hosted instance named '\(name)' serves counters: see mvm ps")
        }
        let r: APIClient.Response
        do { r = try APIClient(socketPath: socket).send("GET", "/metrics") } catch { throw MicroVMError(.backend, "hosted instance '\(name)': \(error)") }
        return r.body
    }

    /// Controller ("cpu", "memory"; "unified" on cgroup v2) → the directory of the cgroup libvirt
    /// made for QEMU's domain (the parent of its emulator and vCPU groups), from /proc/PID/cgroup.
    public static func domainCgroups(of pid: Int32, root: String = "/sys/fs/cgroup") -> [String: String] {
        guard let text = readWholeText("/proc/\(pid)/cgroup") else { return [:] }
        var out: [String: String] = [:]
        for line in text.split(separator: "\n") {
            let f = line.split(separator: ":", maxSplits: 2).map(String.init)
            guard f.count == 3 else { continue }
            var path = f[2]
            for leaf in ["/emulator", "/vcpu"] where path.contains(leaf) { path = String(path[..<path.range(of: leaf)!.lowerBound]) }
            guard path.hasPrefix("/machine") else { continue }
            for c in ["cpu", "memory", "cpuset"] where f[1].split(separator: ",").contains(Substring(c)) { out[c] = root + "/" + c + path }
            if f[0] == "0", f[1].isEmpty, FileManager.default.fileExists(atPath: root + path + "/cgroup.procs") { out["unified"] = root + path }
        }
        return out
    }

    /// Stops QEMU's process as a whole (its vCPUs and device threads): another `mvm` owns the
    /// embedded driver's connection, so the process is signalled rather than the domain suspended.
    public func pause(name: String) async throws { try signalQEMU(name, SIGSTOP) }
    public func resume(name: String) async throws { try signalQEMU(name, SIGCONT) }

    func signalQEMU(_ name: String, _ sig: Int32) throws {
        guard let pid = qemuPid(name: name) else {
            throw MicroVMError.notFound("no running QEMU for hosted instance '\(name)': see mvm ps")
        }
        guard kill(pid, sig) == 0 else { throw MicroVMError(.permissionDenied, "cannot signal QEMU (pid \(pid)) of '\(name)': \(String(cString: strerror(errno)))") }
    }

    /// The QEMU process of a running instance (from the driver's pid file), so the benchmark can
    /// read its memory (PSS) from /proc.
    public func qemuPid(name: String) -> Int32? {
        qemuPid(record: HostedRecord.load(name, in: recordDirectory) ?? HostedRecord(name: name, uri: uri))
    }

    func qemuPid(record r: HostedRecord) -> Int32? {
        let runDir: String
        if let root = HostedBackend(connect: r.uri, paths: paths).embeddedRoot { runDir = root + "/run/qemu" }
        else if r.uri.hasPrefix("qemu:///session") {
            runDir = (ProcessInfo.processInfo.environment["XDG_RUNTIME_DIR"] ?? "/run/user/\(getuid())") + "/libvirt/qemu/run"
        } else if r.uri.hasPrefix("qemu:///system") { runDir = "/run/libvirt/qemu" }
        else { return nil }
        guard let text = try? String(contentsOfFile: "\(runDir)/\(r.name).pid", encoding: .utf8),
              let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)), pid > 0, kill(pid, 0) == 0 else { return nil }
        return pid
    }
}

/// What `mvm ps/stop/logs` in any process know about a hosted run, kept in the state directory
/// for as long as the run lasts.
struct HostedRecord: Codable, Sendable {
    var name: String
    var uri: String
    var logPath: String = ""
    var runDirectory: String = ""
    var startedAt: Date = Date()
    var cpus: Int = 1
    var memory: ByteCount = 0
    var ownerPID: Int32 = 0
    var blockDevices: [String] = []
    var taps: [String] = []
    /// The taps the run created (and must delete); a killed run's are deleted by whoever finds
    /// its record stale (`mvm ps`, `mvm stop`, `mvm gc`).
    var ownTaps: [String]?
    var machine: String?
    /// The control API the run serves for the domain (`mvm update`, `mvm stats`).
    var apiSocket: String?
    /// The memory the guest booted with, when it has a balloon (`memory` is then what the
    /// balloon leaves it).
    var bootMemory: ByteCount?
    /// The vCPU slots the domain booted with, when it has room for more than `cpus`.
    var maxCPUs: Int?
    /// The guest's vsock CID when its init serves the vsock shell (`mvm exec`).
    var agentCID: UInt32?

    static func file(_ name: String, in dir: String) -> String {
        // Names may hold any character but '/', so the file name is an encoding of it.
        dir + "/" + Data(name.utf8).base64EncodedString().replacingOccurrences(of: "/", with: "_") + ".json"
    }

    func save(in dir: String) throws {
        let data = try JSONEncoder().encode(self)
        do { try data.write(to: URL(fileURLWithPath: Self.file(name, in: dir)), options: .atomic) }
        catch { throw MicroVMError(.permissionDenied, "cannot write the instance record in \(dir): set MVM_STATE_DIR to a writable place", cause: error) }
    }

    static func load(_ name: String, in dir: String) -> HostedRecord? {
        guard let d = FileManager.default.contents(atPath: file(name, in: dir)) else { return nil }
        return try? JSONDecoder().decode(HostedRecord.self, from: d)
    }

    static func all(in dir: String) -> [HostedRecord] {
        let files = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        return files.filter { $0.hasSuffix(".json") }.sorted().compactMap {
            FileManager.default.contents(atPath: dir + "/" + $0).flatMap { try? JSONDecoder().decode(HostedRecord.self, from: $0) }
        }
    }
}

/// Set from libvirt's event thread when the domain stops, read by the run's task.
final class StopFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    func set() { lock.lock(); value = true; lock.unlock() }
    var isSet: Bool { lock.lock(); defer { lock.unlock() }; return value }
}

/// One open connection per URI for the life of the process.
final class ConnectionCache: @unchecked Sendable {
    static let shared = ConnectionCache()
    private let lock = NSLock()
    private var open: [String: LibvirtConnection] = [:]

    func connection(_ uri: String) throws -> LibvirtConnection {
        lock.lock(); defer { lock.unlock() }
        if let c = open[uri] { return c }
        let c = try LibvirtConnection.open(uri)
        open[uri] = c
        return c
    }
}

/// Which machine type a connection gets: `microvm` where libvirt's domain capabilities list it
/// and libvirt accepts our definition, else `pc`. A refusal is remembered per URI.
final class MachineChoice: @unchecked Sendable {
    static let shared = MachineChoice()
    private let lock = NSLock()
    private var rejected: [String: String] = [:]
    private var offered: [String: Bool] = [:]

    func preferred(for conn: LibvirtConnection, accelerator: DomainConfig.Accelerator) -> String {
        let key = conn.uri + "|" + accelerator.rawValue
        lock.lock()
        if rejected[key] != nil { lock.unlock(); return "pc" }
        let known = offered[key]
        lock.unlock()
        let has = known ?? (conn.domainCapabilities(machine: "microvm", virtType: accelerator.rawValue) != nil)
        lock.lock(); offered[key] = has; lock.unlock()
        return has ? "microvm" : "pc"
    }

    func reject(_ machine: String, for conn: LibvirtConnection, reason: String) {
        lock.lock(); defer { lock.unlock() }
        for a in ["kvm", "qemu"] { rejected[conn.uri + "|" + a] = reason }
    }
}

enum Warnings {
    private static let seen = Mutex()
    static func once(_ text: String) {
        guard seen.insert(text) else { return }
        FileHandle.standardError.write(Data("warning: \(text)\n".utf8))
    }

    final class Mutex: @unchecked Sendable {
        private let lock = NSLock()
        private var set: Set<String> = []
        func insert(_ s: String) -> Bool { lock.lock(); defer { lock.unlock() }; return set.insert(s).inserted }
    }
}
