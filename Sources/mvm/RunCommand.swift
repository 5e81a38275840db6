import ArgumentParser
import Foundation
import Synchronization
import MicroVM

extension RunMode: ExpressibleByArgument {}

/// The instance options `mvm run` and `mvm bench` share: size, placement and what to boot.
struct InstanceOptions: ParsableArguments {
    @Option(help: "Instance profile from config/microvm.yaml (tiny, small, bench, …).") var profile: String?
    @Option(help: "Number of vCPUs (overrides the profile).") var cpus: Int?
    @Option(help: "Memory, e.g. 256M or 1G (overrides the profile).") var memory: String?
    @Option(help: "CPU placement: dedicated, pinned or shared (overrides the profile).") var placement: String?
    @Option(help: "Configuration file (default: MVM_CONFIG, else config/microvm.yaml).") var config: String?

    /// The slice asked for: the profile, then the flags on top. Checked, not yet granted.
    func requestedSlice() throws -> (MicroVMConfig, ResourceSlice) {
        let cfg = try MicroVMConfig.load(path: config)
        var slice = try cfg.profile(named: profile ?? cfg.defaults.profile).slice()
        if let cpus {
            guard cpus >= 1 else { throw MicroVMError.invalidArgument("--cpus must be at least 1 (got \(cpus))") }
            slice.cpus = cpus
        }
        if let memory { slice.memory = try ByteCount(parsing: memory) }
        if let placement { slice.placement = try Placement(parsing: placement) }
        return (cfg, slice)
    }
}

struct RunCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Run a command in a VM (direct or hosted) or a container, and exit with its status.",
        discussion: """
        Examples:
          mvm run --mode container -- sh -c 'echo hello'
          mvm run --mode hosted --profile tiny -- uname -r
          mvm run --mode direct --kernel vmlinuz --cpus 2 -- cat /proc/cpuinfo
        """)

    @Option(help: "direct (our VMM on /dev/kvm), hosted (QEMU through libvirt) or container.") var mode: RunMode = .direct
    @OptionGroup var instance: InstanceOptions
    @Option(help: "Kernel (bzImage or ELF vmlinux); default: the built guest image.") var kernel: String?
    @Option(help: "Initial ramdisk; default: the built guest image's.") var initrd: String?
    @Option(help: "Extra kernel command-line arguments.") var cmdline: String = ""
    @Option(help: "Attach a raw disk image: FILE[,ro][,direct] (repeatable).") var disk: [String] = []
    @Flag(help: "Do not attach the image's rootfs disk (the command runs in the initramfs).") var noRootfs = false
    @Option(help: "Run this container image (a 'docker save' tarball or a tar of an OCI image layout) in any mode: its rootfs is the container's root or the VM's root disk (converted once, cached by content), its entrypoint, command, environment and working directory the defaults.") var image: String?
    @Flag(help: "Direct mode: run the VMM outside its jail (namespaces, empty root, no privileges, seccomp), for debugging; mvm ps says so.") var noJail = false
    @Option(help: "Network over a tap: tap[=NAME][,host=ADDR[/LEN]][,guest=ADDR[/LEN]] (default: a new tap on a free /30 of 10.200/16).") var net: String?
    @Option(help: "Give the guest a virtio-vsock device with this CID (3 or more; needs /dev/vhost-vsock on the host, for direct and hosted VMs alike).") var vsock: UInt32?
    @Option(help: "Hosted mode: boot with room for this many vCPUs (CPU hotplug), so mvm update --cpus can add and remove vCPUs live.") var maxCpus: Int?
    @Flag(help: "Direct mode: give the guest a virtio-balloon (statistics every second, free page reporting, deflate on OOM), so mvm update --memory can resize it live and the pages it frees go back to the host.") var balloon = false
    @Flag(help: "With --vsock: the guest agent serves `mvm exec` on vsock port 1024 while the command runs. Any host process can connect to it and run commands as root in the guest: use it only where the host's users are trusted.") var vsockShell = false
    @Option(help: "libvirt URI for --mode hosted (default qemu:///embed).") var connect: String?
    @Option(help: "Container runtime for --mode container: runc, crun, runsc (gVisor) or docker.") var runtime: String?
    @Option(help: "Instance name (default: generated).") var name: String?
    @Option(help: "Seconds before the instance is killed.") var timeout: Double = 300
    @Flag(help: "Print the run's status, output and phase timings (seconds from the command's start, CLOCK_MONOTONIC) as JSON instead of the command's output.") var json = false
    @Flag(name: [.customShort("d"), .long], help: "Detach: return once the instance is up, leaving it to run (mvm ps, logs -f, pause, stop). Its status and output go to the file printed.") var detach = false
    @Argument(parsing: .postTerminator, help: "The command to run inside.") var command: [String] = []

    func run() async throws {
        // The user's command started here: every phase is timed from this moment.
        let clock = LaunchClock()
        // An existing ledger opens on another thread meanwhile; it is used only once the input holds.
        let warmup = LedgerWarmup()
        let status: Int32 = try await reportingErrors {
            let (cfg, slice) = try instance.requestedSlice()
            var spec = VMSpec(kernel: kernel, initrd: initrd, cmdline: cmdline, cpus: slice.cpus, memory: slice.memory,
                              command: command, slice: slice, timeout: timeout)
            if let name { spec.name = name }
            spec.disks = try disk.map(DiskSpec.init(parsing:))
            if let net { spec.net = try NetSpec(parsing: net) }
            spec.vsockCID = vsock
            spec.vsockShell = vsockShell
            if balloon { spec.balloon = BalloonSpec() }
            spec.maxCPUs = maxCpus
            if let image { try Self.use(image: image, for: &spec, mode: mode, noRootfs: noRootfs) }
            if noJail && mode != .direct {
                throw MicroVMError.invalidArgument("--no-jail is for --mode direct (the jail is the direct VMM's); leave it out for --mode \(mode.rawValue)")
            }
            let backend = try Backends.make(mode: mode, connect: connect ?? cfg.defaults.connect,
                                            runtime: runtime ?? cfg.defaults.runtime, attachRootfs: !noRootfs, jail: !noJail)
            if detach {
                try SpecValidator.validate(spec, mode: backend.mode)
                try backend.checkHost()
                return try await Detached.start(name: spec.name, backend: backend, json: json)
            }
            // The ledger is opened at the grant, after validation: bad input allocates nothing.
            let launcher = InstanceLauncher(grants: AllocatorGrants(config: cfg, warmup: warmup))
            let checked = spec
            let result = try await SignalStop.cancellingOnSignals {
                try await launcher.launch(checked, on: backend, clock: clock)
            }
            if json {
                let enc = JSONEncoder()
                enc.outputFormatting = [.prettyPrinted, .sortedKeys]
                print(String(decoding: try enc.encode(result), as: UTF8.self))
            } else {
                FileHandle.standardOutput.write(Data(result.output.utf8))
            }
            return result.exitStatus
        }
        if status != 0 { throw ExitCode(status) }
    }
}

extension RunCommand {
    /// Gives `spec` the image's rootfs (a tree for containers; for VMs, also the ext4 disk made
    /// from it) and its defaults: the entrypoint before the command given, else the image's
    /// command; its environment and working directory.
    static func use(image path: String, for spec: inout VMSpec, mode: RunMode, noRootfs: Bool) throws {
        if noRootfs {
            throw MicroVMError.invalidArgument("--image gives the instance its root filesystem; --no-rootfs takes it away: drop one of them")
        }
        let image = try ContainerImageStore().prepare(tarball: path, disk: mode.isVM)
        spec.rootfs = image.rootfsTree
        if mode.isVM { spec.rootfsDisk = image.rootfsDisk }
        spec.command = image.config.command(spec.command)
        guard !spec.command.isEmpty else {
            throw MicroVMError.invalidArgument("the image '\(path)' names no command (no Entrypoint or Cmd): give one after --, e.g. -- /bin/sh -c 'echo hi'")
        }
        if !image.config.env.isEmpty { spec.environment = image.config.env }
        if !image.config.workingDir.isEmpty { spec.workingDirectory = image.config.workingDir }
    }
}

/// SIGINT, SIGTERM and SIGHUP cancel the run instead of killing the process mid-way: a VM is
/// asked to stop, a container is killed, and the run's cleanup removes its cgroup, tap and
/// grant. `mvm run` then exits as a shell reports a signal (128 + its number).
enum SignalStop {
    static func cancellingOnSignals<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) async throws -> T {
        // The handlers are in place before the work starts: a signal at any moment is seen.
        let received = Mutex<Int32?>(nil)
        let running = Mutex<Task<T, any Error>?>(nil)
        let signals = [SIGINT, SIGTERM, SIGHUP]
        var previous: [Int32: sighandler_t?] = [:]
        let sources = signals.map { sig -> any DispatchSourceSignal in
            previous[sig] = signal(sig, SIG_IGN)
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler {
                received.withLock { if $0 == nil { $0 = sig } }
                running.withLock { $0?.cancel() }
            }
            s.resume()
            return s
        }
        defer {
            sources.forEach { $0.cancel() }
            for sig in signals { signal(sig, previous[sig] ?? SIG_DFL) }
        }
        let task = Task { try await body() }
        running.withLock { $0 = task }
        if received.withLock({ $0 }) != nil { task.cancel() }
        let outcome = await task.result
        // Whatever the run ended with, an instance a signal stopped reports the signal.
        if let sig = received.withLock({ $0 }) {
            FileHandleOutput.stderr("mvm: stopped by signal \(sig); the instance was stopped and its resources released\n")
            throw ExitCode(128 + sig)
        }
        return try outcome.get()
    }
}


/// `mvm run -d`: the same `mvm run`, attached to nothing, in a session of its own (so closing the
/// terminal does not stop it); it holds the grant, the cgroup and the link and cleans them up
/// when the instance ends, exactly as an attached run does. This process returns once the
/// backend lists the instance, or reports why it ended first.
enum Detached {
    static func start(name: String, backend: any InstanceBackend, json: Bool) async throws -> Int32 {
        let dir = Paths.default.instances + "/detached"
        try Paths.ensureDirectory(dir)
        let out = dir + "/" + name + ".out"
        var args = Array(CommandLine.arguments.dropFirst()).filter { $0 != "-d" && $0 != "--detach" }
        if !args.contains("--name") && !args.contains(where: { $0.hasPrefix("--name=") }) {
            // The generated name, so the run is found by it; before the command's `--`.
            let at = args.firstIndex(of: "--") ?? args.endIndex
            args.insert(contentsOf: ["--name", name], at: at)
        }
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/setsid")
        // -w: setsid waits for the run, so its status tells this process if it ended early.
        p.arguments = ["-w", exe] + args
        p.standardInput = FileHandle.nullDevice
        let fd = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw MicroVMError(.permissionDenied, "cannot create \(out): \(String(cString: strerror(errno)))") }
        let handle = FileHandle(fileDescriptor: fd, closeOnDealloc: true)
        p.standardOutput = handle
        p.standardError = handle
        try p.run()
        let deadline = Monotonic.seconds() + 300
        while Monotonic.seconds() < deadline {
            if let list = try? await backend.list(), let up = list.first(where: { $0.name == name && $0.state == "running" }) {
                let pid = up.pid.map(String.init) ?? "null"
                if json { print(#"{"name": "\#(name)", "pid": \#(pid), "output": "\#(out)"}"#) } else {
                    print(name)
                    FileHandleOutput.stderr("mvm: \(name) runs detached\(up.pid.map { " (pid \($0))" } ?? ""); its status and output go to \(out)\n")
                }
                return 0
            }
            if !p.isRunning {
                let text = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
                FileHandleOutput.stderr(text)
                FileHandleOutput.stderr("mvm: \(name) ended before it was up (status \(p.terminationStatus))\n")
                return p.terminationStatus == 0 ? 1 : p.terminationStatus
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        throw MicroVMError(.timeout, "\(name) was not up within 300 s; it keeps starting in the background (pid \(p.processIdentifier)): see \(out) and mvm ps")
    }
}
