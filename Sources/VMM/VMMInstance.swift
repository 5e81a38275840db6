import Devices
import FoundationEssentials
import Dispatch
#if canImport(Glibc)
import Glibc
#endif
import KVM
import LinuxBoot
import MicroVMCore
import Synchronization
import VMMAPI

/// One micro-VM as `mvm-vmm` runs it: built from a `VMConfiguration` (a config file or the API's
/// PUTs) when started, then paused, resumed, sent Ctrl-Alt-Del and counted through the
/// `VMMController` calls the API makes. Every machine gets the same description (legacy PC
/// devices, an entropy device at least, so ACPI tables as well as the MP table), whatever it boots.
public final class VMMInstance: VMMController, Sendable {
    public struct Options: Sendable {
        public var id: String
        public var devicePath: String
        /// Where the guest's serial console goes.
        public var console: OutputSink
        /// Called once, from a thread of its own, when the VM has stopped: why, and the vCPU's
        /// registers where the stop came with them and the reason does not already carry them
        /// (a triple fault).
        public var onExit: @Sendable (StopReason, _ registers: String?) -> Void
        /// Called once the machine is built (guest memory, devices, taps, disks, kernel loaded)
        /// and before any of its threads starts: a jailed VMM enters its jail here.
        public var beforeThreads: (@Sendable () throws -> Void)?
        /// Called first on each thread the machine starts, with its kind.
        public var onThread: (@Sendable (VMMThreadKind) -> Void)?
        /// Once every vCPU has entered the guest, the process's start-up code is unmapped
        /// (`ExecutableImage.dropResidentPages`): for a process that runs one VM.
        public var dropsStartupPages = false

        public init(id: String, devicePath: String = "/dev/kvm", console: @escaping OutputSink = { _ in },
                    beforeThreads: (@Sendable () throws -> Void)? = nil, onThread: (@Sendable (VMMThreadKind) -> Void)? = nil,
                    onExit: @escaping @Sendable (StopReason, _ registers: String?) -> Void = { _, _ in }) {
            self.id = id; self.devicePath = devicePath; self.console = console; self.onExit = onExit
            self.beforeThreads = beforeThreads; self.onThread = onThread
        }
    }

    /// Boot arguments when the configuration gives none: the serial console, reboot through the
    /// i8042 (which ends the VM) and what this machine needs.
    public static let defaultBootArgs = KernelCommandLine.build(command: [], backend: VirtualMachine.kernelParameters)

    struct Running: @unchecked Sendable {
        // SAFETY (Sendable): each member is Sendable or only used under `running`'s lock.
        let vm: VirtualMachine
        let devices: LegacyDevices
        let attachments: [VirtioAttachment]
        let tap: TapDevice?
        let startedAt: Double
    }

    public let options: Options
    private let running = Mutex<Running?>(nil)
    /// Why and when (CLOCK_MONOTONIC seconds) the VM stopped.
    private let stopped = Mutex<(reason: StopReason, at: Double)?>(nil)
    private let exited = DispatchSemaphore(value: 0)

    public init(options: Options) { self.options = options }

    public var state: InstanceState {
        running.withLock { r in
            guard let r else { return .notStarted }
            return r.vm.isPaused ? .paused : .running
        }
    }

    /// Why the VM stopped; nil while it runs or before it starts.
    public var stopReason: StopReason? { stopped.withLock { $0?.reason } }

    public func start(_ config: VMConfiguration) throws {
        let vm = try running.withLock { r in
            guard r == nil else { throw MicroVMError(.invalidArgument, "the microVM is already started") }
            let built = try build(config)
            r = built
            return built.vm
        }
        // Once every vCPU runs the guest, what started them has run its course.
        if options.dropsStartupPages {
            _ = vm.waitUntilVCPUsEnter(timeout: 1)
            ExecutableImage.dropResidentPages()
        }
    }

    private func build(_ config: VMConfiguration) throws -> Running {
        let plan = try VMMBootPlan(config, id: options.id)
        var machine = MachineConfiguration(cpus: plan.cpus, memory: plan.memory, devicePath: options.devicePath)
        machine.hugePages = plan.hugePages
        machine.vcpuPins = plan.vcpuPins
        if let onThread = options.onThread { machine.onVCPUThread = { _ in onThread(.vcpu) } }
        let vm = try VirtualMachine(machine)
        let devices = try vm.installLegacyDevices(console: options.console)
        let tap = try plan.tapName.map { try TapDevice(name: $0) }
        let virtio = try vm.installVirtioDevices(spec: plan.deviceSpec, tap: tap, mac: plan.mac, startThreads: false)
        do {
            let cmdline = [plan.bootArgs, virtio.cmdline].filter { !$0.isEmpty }.joined(separator: " ")
            let entry = try LinuxLoader.load(kernelPath: plan.kernel, initrdPath: plan.initrd, cmdline: cmdline, memory: vm.memory, cpus: plan.cpus,
                                             virtioMMIO: virtio.attachments.map(\.acpiDevice))
            try vm.setBootEntry(BootEntry(entry))
            try options.beforeThreads?()
            var deviceThread: (@Sendable () -> Void)?
            if let onThread = options.onThread { deviceThread = { onThread(.device) } }
            try vm.startVirtioThreads(virtio.attachments, onThread: deviceThread)
            try vm.start()
        } catch {
            virtio.attachments.forEach { $0.stop() }
            throw error
        }
        let started = Running(vm: vm, devices: devices, attachments: virtio.attachments, tap: tap, startedAt: Monotonic.seconds())
        // The wait thread is what reports the VM's end: without it, nothing would.
        try NativeThread.detach(name: "vmm-wait") { [self] in
            let reason = vm.wait()
            stopped.withLock { $0 = (reason, Monotonic.seconds()) }
            started.attachments.forEach { $0.stop() }
            var registers = vm.registerDump
            if case .error = reason { registers = nil }
            options.onExit(reason, registers)
            exited.signal()
        }
        return started
    }

    private func current() throws -> Running {
        guard let r = running.withLock({ $0 }) else {
            throw MicroVMError(.invalidArgument, "the microVM is not started: PUT /actions {\"action_type\": \"InstanceStart\"} first")
        }
        if let reason = stopReason { throw MicroVMError(.invalidArgument, "the microVM has stopped (\(reason))") }
        return r
    }

    public func pause() throws { try current().vm.pause() }
    public func resume() throws { try current().vm.resume() }
    public func sendCtrlAltDel() throws { try current().devices.i8042.pressCtrlAltDel() }

    private func balloon() throws -> VirtioBalloon {
        guard let b = try current().attachments.lazy.compactMap({ $0.transport.device as? VirtioBalloon }).first else {
            throw NoBalloonDevice()
        }
        return b
    }

    public func setBalloon(amountMib: Int) throws {
        guard amountMib >= 0, amountMib < 1 << 20 else { throw MicroVMError.invalidArgument("amount_mib \(amountMib) is out of range") }
        try balloon().setTarget(pages: UInt32(amountMib) * 256)
    }

    public func balloonStatistics() throws -> BalloonStatistics {
        let b = try balloon()
        return BalloonStatistics(targetPages: b.targetPages, actualPages: b.actualPages, guest: b.statistics.values)
    }

    public func setBalloonStatisticsInterval(_ seconds: Int) throws { try balloon().setStatsInterval(seconds) }

    /// Stops the VM (its vCPUs leave the guest; `onExit` follows).
    public func stop() { running.withLock { $0 }?.vm.requestStop(.requested) }

    /// Blocks until the VM has been started (by `start` or the API) and has stopped; returns why.
    public func waitForExit() -> StopReason {
        exited.wait()
        exited.signal()
        return stopReason ?? .requested
    }

    /// When the machine reached each milestone, in CLOCK_MONOTONIC seconds: `created` (its
    /// construction began), `firstInstruction` (vCPU 0 entered the guest), `ready` (the guest's
    /// init wrote the boot timer), `stopped`.
    public var milestones: [String: Double] {
        guard let r = running.withLock({ $0 }) else { return [:] }
        var m = ["created": r.vm.createdAt]
        m["firstInstruction"] = r.vm.firstEntry
        m["ready"] = r.vm.readyAt(r.devices)
        m["stopped"] = stopped.withLock { $0?.at }
        return m
    }

    public func metricsText() -> String {
        var m = PrometheusText()
        let r = running.withLock { $0 }
        m.gauge("mvm_vmm_state", "0 not started, 1 running, 2 paused, 3 stopped",
                stopReason != nil ? 3 : [.notStarted: 0, .running: 1, .paused: 2][state] ?? 0)
        if let r {
            m.gauge("mvm_vmm_vcpus", "vCPUs of the machine", Double(r.vm.vcpus.count))
            m.gauge("mvm_vmm_memory_bytes", "guest RAM", Double(r.vm.configuration.memory.bytes))
            m.gauge("mvm_vmm_uptime_seconds", "since InstanceStart", Monotonic.seconds() - r.startedAt)
            m.counter("mvm_vmm_vcpu_run_seconds_total", "time the vCPUs spent in KVM_RUN", [([:], r.vm.guestSeconds)])
            m.counter("mvm_vmm_exits_total", "exits from the guest to the VMM, by kind", r.vm.exitCounts.map { (["kind": $0.kind], Double($0.count)) })
            m.gauge("mvm_vmm_ioeventfds", "virtqueue notify registers KVM signals without an exit", Double(r.vm.ioeventfdsRegistered.load(ordering: .relaxed)))
            m.gauge("mvm_vmm_irqfds", "device interrupt lines KVM injects from an eventfd", Double(r.vm.irqfdsRegistered.load(ordering: .relaxed)))
            m.counter("mvm_vmm_i8042_resets_total", "reset pulses from the guest", [([:], Double(r.devices.i8042.resetCount))])
            let devices = r.attachments.map { a -> (labels: [String: String], t: VirtioMMIOTransport) in
                (["device": VMMInstance.deviceName(a.transport.device.deviceType), "irq": String(a.irq)], a.transport)
            }
            m.counter("mvm_vmm_virtio_requests_total", "descriptor chains a device served", devices.map { ($0.labels, Double($0.t.requestsServed.load(ordering: .relaxed))) })
            m.counter("mvm_vmm_virtio_bytes_to_guest_total", "bytes a device wrote into guest buffers", devices.map { ($0.labels, Double($0.t.bytesToGuest.load(ordering: .relaxed))) })
            m.counter("mvm_vmm_virtio_notifications_total", "queue kicks from the driver", devices.map { ($0.labels, Double($0.t.notifications.load(ordering: .relaxed))) })
            m.counter("mvm_vmm_virtio_interrupts_total", "used-buffer and config interrupts raised", devices.map { ($0.labels, Double($0.t.interruptsRaised.load(ordering: .relaxed))) })
            if let b = r.attachments.lazy.compactMap({ $0.transport.device as? VirtioBalloon }).first {
                let c = b.counters
                m.gauge("mvm_vmm_balloon_target_bytes", "memory the host asked the guest to give back", Double(b.targetPages) * 4096)
                m.gauge("mvm_vmm_balloon_actual_bytes", "memory the guest holds in the balloon", Double(b.actualPages) * 4096)
                m.counter("mvm_vmm_balloon_pages_total", "pages through the balloon's queues, by queue",
                          [(["queue": "inflate"], Double(c.inflatedPages)), (["queue": "deflate"], Double(c.deflatedPages))])
                m.counter("mvm_vmm_balloon_reported_bytes_total", "free memory the guest reported", [([:], Double(c.reportedBytes))])
                m.counter("mvm_vmm_balloon_discarded_bytes_total", "guest memory given back to the host", [([:], Double(c.discardedBytes))])
                m.counter("mvm_vmm_balloon_rejected_total", "page numbers or ranges outside guest RAM, or refused by the host", [([:], Double(c.rejected))])
            }
        }
        return m.text
    }
}

extension VMMInstance {
    /// Virtio device type numbers by name (virtio 1.2, 5).
    static func deviceName(_ type: UInt32) -> String {
        switch type {
        case 1: "net"
        case 2: "block"
        case 4: "rng"
        case 5: "balloon"
        case 19: "vsock"
        default: "type\(type)"
        }
    }
}

/// A `VMConfiguration` checked and resolved into what the machine is built from. Every problem
/// is reported before anything is allocated, naming the field.
struct VMMBootPlan {
    var cpus: Int
    var memory: ByteCount
    var hugePages: Bool
    var vcpuPins: [[Int]]
    var kernel: String
    var initrd: String?
    var bootArgs: String
    var deviceSpec: VMSpec
    var tapName: String?
    var mac: [UInt8]?

    init(_ c: VMConfiguration, id: String) throws {
        let m = c.machineConfig
        if let problem = m.problem { throw MicroVMError.invalidArgument("machine-config: \(problem)") }
        guard let boot = c.bootSource else {
            throw MicroVMError.invalidArgument("no boot source: PUT /boot-source {\"kernel_image_path\": …} before InstanceStart")
        }
        for (what, path) in [("boot-source kernel_image_path", boot.kernelImagePath), ("boot-source initrd_path", boot.initrdPath)] {
            if let path { try Self.requireRegularFile(path, what) }
        }
        guard c.drives.filter(\.isRootDevice).count <= 1 else { throw MicroVMError.invalidArgument("more than one drive has is_root_device: true") }
        guard c.networkInterfaces.count <= 1 else {
            throw MicroVMError.unsupported("this VMM attaches one network interface (got \(c.networkInterfaces.count))")
        }
        cpus = m.vcpuCount
        memory = .mebibytes(UInt64(m.memSizeMib))
        hugePages = m.hugePages == "2M"
        vcpuPins = c.vcpuPins ?? []
        if let bad = vcpuPins.first(where: { $0.isEmpty || $0.contains { $0 < 0 || $0 >= 1024 } }) {
            throw MicroVMError.invalidArgument("x-mvm-vcpu-pins holds \(bad): each vCPU needs host CPUs between 0 and 1023")
        }
        kernel = boot.kernelImagePath
        initrd = boot.initrdPath
        // The root device is /dev/vda: it goes first, and the kernel is told, as Firecracker does.
        let drives = c.drivesRootFirst
        for d in drives { try Self.requireRegularFile(d.pathOnHost, "drive '\(d.driveId)' path_on_host", orBlockDevice: true) }
        var args = boot.bootArgs ?? VMMInstance.defaultBootArgs
        if let root = drives.first, root.isRootDevice {
            args += " root=" + (root.partuuid.map { "PARTUUID=" + $0 } ?? "/dev/vda") + (root.isReadOnly == true ? " ro" : " rw")
        }
        bootArgs = args
        var spec = VMSpec(name: id, cpus: cpus, memory: memory)
        spec.disks = drives.map { DiskSpec(path: $0.pathOnHost, readOnly: $0.isReadOnly ?? false) }
        if let problem = c.vsock?.problem { throw MicroVMError.invalidArgument("vsock: \(problem)") }
        spec.vsockCID = c.vsock?.guestCid
        if let b = c.balloon {
            if let problem = b.problem(memSizeMib: m.memSizeMib) { throw MicroVMError.invalidArgument("balloon: \(problem)") }
            spec.balloon = BalloonSpec(amount: .mebibytes(UInt64(b.amountMib)), deflateOnOOM: b.deflateOnOom,
                                       statsInterval: b.statsPollingIntervalS ?? 0, freePageReporting: b.freePageReporting ?? false)
        }
        deviceSpec = spec
        tapName = c.networkInterfaces.first?.hostDevName
        if let text = c.networkInterfaces.first?.guestMac {
            guard let bytes = NetworkInterface.macBytes(text) else {
                throw MicroVMError.invalidArgument("network-interfaces guest_mac '\(text)' is not a MAC address (six hex bytes, AA:BB:CC:DD:EE:FF)")
            }
            mac = bytes
        }
    }

    /// A kernel, initrd or disk must be a readable regular file (a disk may be a block device):
    /// a FIFO or a character device named by a client would block the opening thread (the
    /// API's) or read without end.
    static func requireRegularFile(_ path: String, _ what: String, orBlockDevice: Bool = false) throws {
        var st = stat()
        let kind = stat(path, &st) == 0 ? st.st_mode & S_IFMT : 0
        guard kind == S_IFREG || (orBlockDevice && kind == S_IFBLK), access(path, R_OK) == 0 else {
            throw MicroVMError.notFound("\(what) '\(path)' is not a readable regular file\(orBlockDevice ? " or block device" : "")")
        }
    }
}

/// Prometheus' text exposition format (version 0.0.4), written by hand: a few lines, no registry.
struct PrometheusText {
    private(set) var text = ""

    mutating func gauge(_ name: String, _ help: String, _ value: Double) {
        family(name, help, "gauge", [([:], value)])
    }

    mutating func counter(_ name: String, _ help: String, _ samples: [([String: String], Double)]) {
        family(name, help, "counter", samples)
    }

    private mutating func family(_ name: String, _ help: String, _ type: String, _ samples: [([String: String], Double)]) {
        text += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
        for (labels, v) in samples {
            let l = labels.sorted { $0.key < $1.key }.map { "\($0.key)=\"\($0.value)\"" }.joined(separator: ",")
            let value = v == v.rounded() && abs(v) < 1e15 ? String(Int64(v)) : String(v)
            text += name + (l.isEmpty ? "" : "{\(l)}") + " " + value + "\n"
        }
    }
}
