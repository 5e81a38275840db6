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

/// `InstanceBackend` for `--mode direct`: boots the spec's kernel (or the default image) in a
/// `VirtualMachine`, reads the guest init's framed result from COM1, and tears everything down.
public struct DirectBackend: InstanceBackend {
    public enum ConsoleEcho: Sendable, Equatable {
        /// Keep the console in memory only (and in the instance's log file).
        case none
        /// Also copy it to standard output as it arrives.
        case standardOutput
    }

    public struct Options: Sendable {
        /// Boot even when the host's KVM is not hardware (tiny test guests; Linux will not boot).
        /// Defaults to the environment variable `MVM_DIRECT_ALLOW_EMULATED=1`.
        public var allowEmulatedKVM: Bool
        public var console: ConsoleEcho
        /// Feed standard input to COM1 (an interactive console).
        public var forwardStandardInput: Bool
        public var paths: Paths
        public var devicePath: String
        /// Attach the default image's rootfs disk as /dev/vda (read-only, over virtio-blk) so the
        /// command runs with the image's tools, as in hosted and container modes. Without it the
        /// command runs in the initramfs (busybox only).
        public var attachRootfs: Bool
        /// Enforce the plan's slice in a cgroup of its own (as root).
        public var enforceInCgroup: Bool
        /// This process runs this one VM (`mvm run`): the whole process joins the VM's cgroup,
        /// so the VMM's memory is limited too. Otherwise only vCPU threads join it.
        public var processPerInstance: Bool

        public init(allowEmulatedKVM: Bool = ProcessInfo.processInfo.environment["MVM_DIRECT_ALLOW_EMULATED"] == "1",
                    console: ConsoleEcho = .none, forwardStandardInput: Bool = false, paths: Paths = .default, devicePath: String = "/dev/kvm",
                    attachRootfs: Bool = true, enforceInCgroup: Bool = getuid() == 0, processPerInstance: Bool = false) {
            self.allowEmulatedKVM = allowEmulatedKVM; self.console = console; self.forwardStandardInput = forwardStandardInput
            self.paths = paths; self.devicePath = devicePath; self.attachRootfs = attachRootfs
            self.enforceInCgroup = enforceInCgroup; self.processPerInstance = processPerInstance
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
        // A record lets `mvm ps/stop/logs` find the VM; only a process that runs this one VM
        // (`mvm run`) writes one, since `mvm stop` ends the process that holds it.
        let records = self.records
        let record = DirectInstanceRecord(name: spec.name, pid: getpid(), pidStart: ProcessIdentity.startTime(pid: getpid()),
                                          cpus: spec.cpus, memory: spec.memory, startedAt: Date(),
                                          logPath: options.paths.instances + "/" + spec.name + "/console.log")
        // `mvm run` runs the VM in an `mvm-vmm` process of its own; a bench or a library caller
        // that runs several VMs keeps them in this process.
        let vmm = options.processPerInstance ? try Self.vmmBinary() : nil
        var claimed = record
        if vmm != nil { claimed.apiSocket = options.paths.instances + "/" + spec.name + "/api.sock" }
        claimed.vsockCID = spec.vsockCID
        claimed.vsockShell = spec.vsockCID != nil && spec.vsockShell
        let logPath = options.processPerInstance ? try records.claim(claimed) : record.logPath
        defer { if options.processPerInstance { records.release(spec.name, owner: claimed) } }
        try Paths.ensureDirectory((logPath as NSString).deletingLastPathComponent)
        let cgroup = try enforce(plan)
        defer { try? cgroup?.set.remove() }
        if let vmm {
            return try await executeInVMMProcess(plan, kernel: kernel, binary: vmm, record: claimed, records: records, logPath: logPath)
        }

        FileManager.default.createFile(atPath: logPath, contents: nil)
        let log = FileHandle(forWritingAtPath: logPath)
        defer { try? log?.close() }
        let recorder = ConsoleRecorder(limit: 16 << 20)
        let echo = options.console == .standardOutput
        let sink: OutputSink = { bytes in
            recorder.sink(bytes)
            _ = try? log?.write(contentsOf: Data(bytes))
            if echo { OutputSinks.standardOutput(bytes) }
        }

        var machine = MachineConfiguration(enforcement: plan.enforcement, devicePath: options.devicePath)
        if let threadsOnly = cgroup?.threadsOnly, threadsOnly, let set = cgroup?.set {
            machine.onVCPUThread = { tid in try? set.add(thread: tid) }
        }
        let vm = try VirtualMachine(machine)
        plan.clock.mark(.spawned)
        let devices = try vm.installLegacyDevices(console: sink)
        // Virtio devices are described to the guest through ACPI (with COM1 and the i8042, whose
        // ISA interrupts a hardware-reduced platform only maps when described); with no disk
        // there are no devices and no tables: the legacy MP-table boot, the shortest.
        // The tap goes away with its descriptor, which the net device's attachment closes.
        let link = try spec.net.map { try TapLink.open($0, owner: spec.name) }
        var deviceSpec = spec
        deviceSpec.disks = plan.disks
        let virtio: (attachments: [VirtioAttachment], cmdline: String)
        do {
            virtio = deviceSpec.disks.isEmpty && link == nil && spec.vsockCID == nil ? ([], "")
                : try vm.installVirtioDevices(spec: deviceSpec, tap: link?.tap)
        } catch {
            link?.tap.remove()
            throw error
        }
        defer { virtio.attachments.forEach { $0.stop() } }
        // The plan's command line already carries the link's addresses (mvm.ip, mvm.gw).
        let cmdline = plan.commandLine(adding: [virtio.cmdline])
        let entry = try LinuxLoader.load(kernelPath: kernel, initrdPath: plan.initrd, cmdline: cmdline, memory: vm.memory, cpus: spec.cpus,
                                         virtioMMIO: virtio.attachments.map(\.acpiDevice))
        let input = options.forwardStandardInput ? InputPump(fd: STDIN_FILENO, into: devices.serial) : nil
        defer { input?.stop() }
        let reason = try await Self.runOffTheCooperativePool(vm, BootEntry(entry), timeout: spec.timeout)
        if let first = vm.firstEntry { plan.clock.mark(.firstInstruction, at: first) }
        // The init's write to the boot timer port, timestamped by the VMM on the VM's clock.
        if let ready = vm.readyAt(devices) { plan.clock.mark(.ready, at: ready) }

        let console = recorder.text
        let parsed = ConsoleParser.parse(console)
        guard let report = parsed.report else {
            let tail = console.split(separator: "\n", omittingEmptySubsequences: false).suffix(15).joined(separator: "\n")
            let code: MicroVMError.Code = reason == .timeout ? .timeout : .guestError
            throw MicroVMError(code, "the guest stopped (\(reason)) without reporting a result\(reason == .timeout ? " within \(Int(spec.timeout)) s" : ""); last console lines:\n\(tail)")
        }
        return plan.result(status: report.status, output: report.outputText, console: console)
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
                             records: InstanceRecords, logPath: String) async throws -> RunResult {
        let spec = plan.spec
        // Made persistent and let go of: a tap takes one process at a time, and the VMM attaches
        // to it by name.
        let link = try spec.net.map { try TapLink.open($0, owner: spec.name, persistent: true) }
        link?.tap.close()
        defer { link?.tap.remove() }
        FileManager.default.createFile(atPath: logPath, contents: nil)
        let config = VMMProcess.configuration(plan, kernel: kernel, tap: link?.tap.name)
        let directory = (logPath as NSString).deletingLastPathComponent
        let outcome = try await VMMProcess.run(
            binary: binary, configuration: config, directory: directory, name: spec.name, logPath: logPath,
            apiSocket: record.apiSocket ?? directory + "/api.sock", allowEmulatedKVM: options.allowEmulatedKVM, timeout: spec.timeout) { pid in
                plan.clock.mark(.spawned)
                var r = record
                r.vmmPID = pid
                try? records.update(r)
            }
        if let t = outcome.milestones["firstInstruction"] { plan.clock.mark(.firstInstruction, at: t) }
        if let t = outcome.milestones["ready"] { plan.clock.mark(.ready, at: t) }
        let console = String(decoding: FileManager.default.contents(atPath: logPath) ?? Data(), as: UTF8.self)
        if options.console == .standardOutput { FileHandle.standardOutput.write(Data(console.utf8)) }
        guard let report = ConsoleParser.parse(console).report else {
            let tail = console.split(separator: "\n", omittingEmptySubsequences: false).suffix(15).joined(separator: "\n")
            let why = outcome.stderr.trimmingCharacters(in: .whitespacesAndNewlines)
            let code: MicroVMError.Code = outcome.timedOut ? .timeout : .guestError
            let when = outcome.timedOut ? " within \(Int(spec.timeout)) s" : ""
            throw MicroVMError(code, "the guest stopped without reporting a result\(when) (mvm-vmm exited with status \(outcome.status)\(why.isEmpty ? "" : ": " + why)); last console lines:\n\(tail)")
        }
        return plan.result(status: report.status, output: report.outputText, console: console)
    }

    /// The plan's enforcement as a cgroup: the whole process joins it when it runs this one VM
    /// (`mvm run`); otherwise (a bench or a library caller running several) only the vCPU
    /// threads do, which bounds their CPU but leaves memory to the guest RAM's own size.
    func enforce(_ plan: LaunchPlan) throws -> (set: CgroupSet, threadsOnly: Bool)? {
        guard options.enforceInCgroup else { return nil }
        let name = "microvm/direct-\(plan.name)"
        // Threads alone can join a cgroup v1 hierarchy; on v2 a thread id moves its whole
        // process, so there a shared process leaves its VMs' CPU to their vCPU count and pins.
        if !options.processPerInstance, try CgroupSet.existing(name: name).mode == .v2 { return nil }
        let set = try CgroupSet.create(name: name, slice: plan.enforcement.cgroupSlice)
        do {
            if options.processPerInstance { try set.add(pid: getpid()) }
        } catch {
            try? set.remove()
            throw error
        }
        return (set, !options.processPerInstance)
    }

    public func list() async throws -> [InstanceInfo] {
        records.live().map { r in
            // A run that has not started its VMM yet is starting.
            InstanceInfo(name: r.name, mode: .direct, state: r.apiSocket != nil && r.vmmPID == nil ? "starting" : "running", pid: r.vmmPID ?? r.pid, cpus: r.cpus, memory: r.memory,
                         startedAt: r.startedAt, logPath: r.logPath)
        }
    }

    /// SIGTERM to the `mvm run` holding the VM (its handler stops the VM and cleans up), then
    /// SIGKILL after 10 s.
    public func stop(name: String) async throws {
        let r = try running(name)
        kill(r.pid, SIGTERM)
        let deadline = Monotonic.seconds() + 10
        while Monotonic.seconds() < deadline, ProcessIdentity.isAlive(pid: r.pid, startTime: r.pidStart) {
            try? await Task.sleep(for: .milliseconds(50))
        }
        if ProcessIdentity.isAlive(pid: r.pid, startTime: r.pidStart) {
            kill(r.pid, SIGKILL)
            // The run could not clean up after itself: its cgroup is removed here.
            try? CgroupSet.existing(name: "microvm/direct-\(name)").remove()
        }
        records.removeStale(name)
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

    public func pause(name: String) async throws { _ = try call(name, "PATCH", "/vm", body: #"{"state": "Paused"}"#) }
    public func resume(name: String) async throws { _ = try call(name, "PATCH", "/vm", body: #"{"state": "Resumed"}"#) }
    public func stats(name: String) async throws -> String { try call(name, "GET", "/metrics") }

    /// Through the guest init's vsock shell (`--vsock CID --vsock-shell`), over the host's
    /// vhost-vsock: the command, then its status on a line of its own.
    public func exec(name: String, command: [String]) async throws -> (status: Int32, output: String) {
        let r = try running(name)
        guard let cid = r.vsockCID, r.vsockShell == true else {
            throw MicroVMError.unsupported("direct instance '\(name)' has no agent: start it with --vsock CID --vsock-shell (needs /dev/vhost-vsock) to use mvm exec")
        }
        let marker = "@@mvm-exec-status="
        let script = command.map(ProcessRunner.shellQuote).joined(separator: " ") + " 2>&1; echo \"\(marker)$?\"; exit\n"
        let reply = try await Task.detached { try VsockShell.run(cid: cid, port: GuestProtocol.vsockShellPort, input: script, timeout: 3600) }.value
        guard let at = reply.range(of: marker, options: .backwards),
              let status = Int32(reply[at.upperBound...].prefix { $0.isNumber }) else {
            throw MicroVMError(.guestError, "the guest's shell on vsock \(cid):\(GuestProtocol.vsockShellPort) gave no status: \(reply.suffix(300))")
        }
        return (status, String(reply[..<at.lowerBound]))
    }

    /// vCPU threads block; so does waiting for them. Keep that off Swift's cooperative threads,
    /// and turn task cancellation into a stop request.
    static func runOffTheCooperativePool(_ vm: VirtualMachine, _ entry: BootEntry, timeout: Double) async throws -> StopReason {
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<StopReason, any Error>) in
                let t = Thread {
                    do { c.resume(returning: try vm.run(entry, timeout: timeout)) } catch { c.resume(throwing: error) }
                }
                t.name = "vmm-wait"
                t.start()
            }
        } onCancel: {
            vm.requestStop(.requested)
        }
    }

    public func logs(name: String) async throws -> String {
        let path = options.paths.instances + "/" + name + "/console.log"
        guard let d = FileManager.default.contents(atPath: path) else {
            throw MicroVMError.notFound("no console log for direct instance '\(name)' (looked in \(path))")
        }
        return String(decoding: d, as: UTF8.self)
    }
}

/// Copies bytes from a file descriptor into the UART's receive FIFO until stopped, polling so
/// that it notices `stop` without needing input to arrive.
final class InputPump: Sendable {
    private let done = Atomic<Bool>(false)

    init(fd: Int32, into serial: Serial8250) {
        let t = Thread { [self] in
            var pending: [UInt8] = []
            var buf = [UInt8](repeating: 0, count: 256)
            while !self.done.load(ordering: .acquiring) {
                if !pending.isEmpty {
                    let n = serial.enqueueInput(pending)
                    pending.removeFirst(min(n, pending.count))
                    if !pending.isEmpty { usleep(2_000); continue }
                }
                var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                guard poll(&p, 1, 100) > 0 else { continue }
                let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n <= 0 { if n == 0 || errno != EINTR { return } else { continue } }
                pending += buf[0..<n]
            }
        }
        t.name = "vmm-stdin"
        t.start()
    }

    func stop() { done.store(true, ordering: .releasing) }
}
