/// The nested test rig: runs a host command inside an L2 Linux where /dev/kvm is real.
///
/// On a host whose own KVM cannot boot Linux, QEMU TCG emulates an AMD-V CPU
/// (`-cpu EPYC,+svm,+npt`); the L2 kernel loads kvm_amd, mounts the host's root read-only over
/// 9p, chroots into it and runs the command in the caller's directory, so host-built binaries
/// (mvm, the test bundles) exercise a real KVM unchanged. Output streams back over the serial
/// console; files come back through a read-write scratch share.
///
/// ```swift
/// var options = RigOptions()
/// options.timeout = 300
/// let result = try RigRunner(options).run(command: ["cat", "/proc/cpuinfo"],
///                                          streamOutput: { FileHandle.standardOutput.write($0) })
/// print(result.status, result.bootSeconds)
/// ```
import Foundation
import MicroVMCore
import Host
import Images

/// How the rig VM is shaped and how long it may run.
public struct RigOptions: Sendable {
    public var cpus: Int = 2
    public var memoryMiB: Int = 3072
    /// Wall-clock limit for the whole run (boot included), in seconds.
    public var timeout: Double = 600
    /// Seconds without a sign of life from the running rig (its 10 s heartbeat, console bytes,
    /// new output) after which it counts as stalled and is killed with a `RigStall`; 0 turns
    /// the watchdog off.
    public var stallTimeout: Double = 180
    /// Seconds the running command may go without new output before the rig counts as stuck
    /// and is killed with a `RigStall`, even while its kernel's heartbeat still comes; 0 (the
    /// default) lets a command be quiet for as long as it likes.
    public var outputTimeout: Double = 0
    /// Host directories shared read-write at the same path inside the rig.
    public var shares: [String] = []
    /// Extra environment for the command, on top of PATH, HOME, the caller's MVM_* and MVM_IN_RIG=1.
    public var environment: [String: String] = [:]
    /// Directory the command starts in; the caller's by default. Must not be under /tmp, /run or
    /// /var/tmp, which are fresh tmpfs inside the rig, unless it is also a share.
    public var workingDirectory: String = FileManager.default.currentDirectoryPath
    public var paths: Paths = .default
    public var qemu: String = "qemu-system-x86_64"
    public init() {}
}

/// What a rig run produced.
public struct RigResult: Sendable {
    /// The command's exit status as the rig's shell saw it (126/127: not runnable / not found).
    public var status: Int32
    /// The command's stdout and stderr together, as the console carried them.
    public var output: Data
    /// Wall seconds from QEMU's start to the command's start.
    public var bootSeconds: Double
    /// Wall seconds from QEMU's start to its exit.
    public var wallSeconds: Double
    /// L2 uptime when the command started.
    public var guestUptimeAtStart: Double?
    /// The longest time, in seconds, the running rig went without a sign of life (heartbeat,
    /// console, output): how close it came to the stall watchdog.
    public var longestSilence: Double = 0
    public var outputText: String { String(decoding: output, as: UTF8.self) }
}

public enum Rig {
    /// A name every rig QEMU carries on its command line (`-name mvm-rig-…`), so leftovers can be found.
    public static let processMarker = "mvm-rig-"

    /// Whether `mvm rig run` can work here, and what to install when not. Starts nothing.
    public static func status(sourceDirectory: String = Paths.sourceDirectory()) -> Capability {
        guard ProcessRunner.which("qemu-system-x86_64") != nil else {
            return Capability(usable: false, detail: "qemu-system-x86_64 is not installed", fix: "apt-get install qemu-system-x86")
        }
        let kernel: DebianKernel
        do { kernel = try DebianKernel.newest() } catch {
            return Capability(usable: false, detail: "no Debian kernel with modules: \(error)", fix: "apt-get install linux-image-amd64")
        }
        do { _ = try ModuleResolver(directory: kernel.modulesDirectory).resolve(RigImage.moduleNames) } catch {
            return Capability(usable: false, detail: "kernel \(kernel.version) lacks rig modules: \(error)", fix: "apt-get install linux-image-amd64")
        }
        guard FileManager.default.isExecutableFile(atPath: "/bin/busybox") else {
            return Capability(usable: false, detail: "/bin/busybox is missing", fix: "apt-get install busybox-static")
        }
        guard FileManager.default.fileExists(atPath: RigImage.initScript(sourceDirectory: sourceDirectory)) else {
            return Capability(usable: false, detail: "the rig init \(RigImage.initScript(sourceDirectory: sourceDirectory)) is missing", fix: "set MVM_SOURCE_DIR to the MicroVM source tree")
        }
        return Capability(usable: true, detail: "QEMU TCG with emulated AMD-V, kernel \(kernel.version) with kvm_amd and 9p: nested real KVM")
    }

    /// Kills every rig QEMU this process started and removes their scratch directories.
    /// Safe from a signal handler's dispatch queue; `mvm rig run` calls it on SIGINT/SIGTERM.
    public static func killAll() { RigProcessRegistry.shared.killAll() }

    /// Makes SIGINT and SIGTERM kill running rigs before the process exits (128+signal).
    public static func installSignalHandlers() { RigProcessRegistry.shared.installSignalHandlers() }
}

/// Boots the rig and runs one command in it. Nothing outlives `run`: QEMU's process group is
/// killed and the scratch directory removed on every path, errors and timeouts included.
public struct RigRunner: Sendable {
    public var options: RigOptions
    public init(_ options: RigOptions = RigOptions()) { self.options = options }

    /// Runs `command`; `streamOutput` receives output chunks as the command writes them.
    /// `scratch` (if given) is called with the host path of the read-write scratch share before
    /// boot, so a caller can place files for the command or read results after (until return).
    public func run(command: [String], scratch: ((String) throws -> Void)? = nil,
                    afterRun: ((String) throws -> Void)? = nil,
                    streamOutput: ((Data) -> Void)? = nil) throws -> RigResult {
        guard !command.isEmpty else { throw MicroVMError.invalidArgument("no command given: use 'mvm rig run -- COMMAND [ARGS…]'") }
        guard options.cpus >= 1, options.cpus <= 64 else { throw MicroVMError.invalidArgument("--cpus \(options.cpus) is out of range 1…64") }
        guard options.memoryMiB >= 512 else { throw MicroVMError.invalidArgument("--memory \(options.memoryMiB) MiB is too small: the rig needs at least 512 MiB") }
        guard options.timeout > 0 else { throw MicroVMError.invalidArgument("--timeout must be positive") }
        guard options.outputTimeout >= 0 else { throw MicroVMError.invalidArgument("--output-timeout must be 0 (off) or positive") }
        guard options.stallTimeout == 0 || options.stallTimeout >= 30 else {
            throw MicroVMError.invalidArgument("--stall-timeout \(Int(options.stallTimeout)) s is shorter than three of the rig's 10 s heartbeats: give at least 30, or 0 for no watchdog")
        }
        guard let qemu = ProcessRunner.which(options.qemu) else {
            throw MicroVMError.notFound("'\(options.qemu)' is not installed: run 'apt-get install qemu-system-x86'")
        }
        let image = try RigImage.ensure(paths: options.paths)

        let scratchDir = try Self.makeScratch()
        let fm = FileManager.default
        defer { try? fm.removeItem(atPath: scratchDir) }
        try writeJob(command: command, scratchDir: scratchDir)
        try scratch?(scratchDir)

        let id = "\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        var argv = [qemu, "-name", Rig.processMarker + id,
                    "-M", "pc", "-accel", "tcg", "-cpu", "EPYC,+svm,+npt",
                    "-smp", String(options.cpus), "-m", "\(options.memoryMiB)M",
                    "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
                    "-kernel", image.kernel.bzImage, "-initrd", image.initrd,
                    // loglevel=2: the console stays quiet but for the kernel's panic and alert lines.
                    "-append", "console=ttyS0 quiet loglevel=2 panic=-1 reboot=k",
                    "-pidfile", scratchDir + "/qemu.pid",
                    "-virtfs", "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap",
                    "-virtfs", "local,path=\(Self.qemuEscape(scratchDir)),mount_tag=rigscratch,security_model=passthrough"]
        // QMP, for the vCPUs' state when the rig stalls (where a socket path fits): in a directory
        // of its own, mode 0700, since the scratch share is open to all for the guest's root.
        let monitorDir = try Self.makeScratch(name: "mvm-rig-qmp", mode: 0o700)
        defer { try? fm.removeItem(atPath: monitorDir) }
        let qmp = monitorDir + "/qmp"
        if qmp.utf8.count < 100 { argv += ["-qmp", "unix:\(Self.qemuEscape(qmp)),server=on,wait=off"] }
        for (i, share) in shares.enumerated() {
            argv += ["-virtfs", "local,path=\(Self.qemuEscape(share)),mount_tag=rigshare\(i),security_model=passthrough"]
        }

        let started = Date()
        let child = try RigChild.spawn(argv, stderrPath: scratchDir + "/qemu.stderr", directories: [scratchDir, monitorDir])
        defer { child.killAndReap() }
        var console = RigConsole()
        var output = Data()
        var bootSeconds: Double?
        // The command's output is the scratch share's `output` file, followed here as it grows:
        // the serial console carries only the rig's markers (under TCG it has been seen to stall
        // for many minutes, and the rig with it).
        var outputFile: FileHandle?
        var watchdog = RigWatchdog(limit: options.stallTimeout, outputLimit: options.outputTimeout, pid: child.pid)
        var heartbeatRead = Date.distantPast
        func follow() {
            if outputFile == nil { outputFile = FileHandle(forReadingAtPath: scratchDir + "/output") }
            // To the file's current end: `availableData` returns one block per call on Linux.
            guard let d = try? outputFile?.readToEnd(), !d.isEmpty else { return }
            output.append(d)
            streamOutput?(d)
            watchdog.output()
        }
        defer { try? outputFile?.close() }
        let outcome = child.pump(deadline: started.addingTimeInterval(options.timeout), tick: {
            follow()
            guard console.phase == .running else { return false }
            // The heartbeat changes every 10 s: read once a second, and no more of it than an uptime.
            if Date().timeIntervalSince(heartbeatRead) >= 1 {
                heartbeatRead = Date()
                watchdog.heartbeat(Self.readSmall(scratchDir + "/alive"))
            }
            return watchdog.isStalled()
        }) { bytes in
            let lines = console.linesOfLife
            console.feed(bytes)
            if bootSeconds == nil, console.phase != .booting {
                bootSeconds = Date().timeIntervalSince(started)
                watchdog.start()
            }
            // A kernel that reports its own lockup over and over is not alive for that.
            if console.linesOfLife != lines || console.lockups.isEmpty { watchdog.sign() }
            return console.isFinished
        }
        // A stalled QEMU is asked for its vCPUs before it is killed.
        let stall = outcome == .stopped
            ? (silent: Date().timeIntervalSince(watchdog.lastSign), cpu: watchdog.cpuPercentSinceLastSign(),
               quiet: watchdog.isStuck() ? Date().timeIntervalSince(watchdog.lastOutput) : nil,
               vcpus: RigMonitor.human("info registers -a", socket: qmp).map(RigMonitor.vcpuSummary) ?? [])
            : nil
        child.killAndReap()
        follow()
        if let stall {
            throw RigStall(silentSeconds: stall.silent, outputSilentSeconds: stall.quiet, qemuCPUPercent: stall.cpu,
                           lastHeartbeat: watchdog.lastHeartbeat, vcpus: stall.vcpus, lockups: console.lockups, output: output)
        }
        let wall = Date().timeIntervalSince(started)
        // QEMU's stderr, without its start-up warnings about the CPU features TCG lacks.
        let stderr = ((try? String(contentsOfFile: scratchDir + "/qemu.stderr", encoding: .utf8)) ?? "")
            .split(separator: "\n").filter { !$0.contains("TCG doesn't support requested feature") }
            .joined(separator: "\n").trimmingCharacters(in: .whitespacesAndNewlines)
        try afterRun?(scratchDir)

        // The rig writes the status to the scratch share once the output is complete: it is the
        // record, whether or not the console's exit marker arrived.
        if let text = Self.readSmall(scratchDir + "/status"), let status = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)) {
            return RigResult(status: status, output: output, bootSeconds: bootSeconds ?? wall, wallSeconds: wall,
                             guestUptimeAtStart: console.guestStartUptime, longestSilence: watchdog.longestSilence)
        }
        switch console.phase {
        case .exited(let status):
            return RigResult(status: status, output: output, bootSeconds: bootSeconds ?? wall, wallSeconds: wall,
                             guestUptimeAtStart: console.guestStartUptime, longestSilence: watchdog.longestSilence)
        case .failed(let why):
            throw MicroVMError(.backend, "the rig could not start the command: \(why)")
        case .booting, .running:
            if outcome == .timedOut {
                guard console.phase == .booting else { throw RigTimedOut(timeout: options.timeout, output: output) }
                throw MicroVMError(.timeout, "the rig ran past --timeout \(Int(options.timeout)) s while booting and was killed; raise --timeout if the command needs longer")
            }
            if console.phase == .booting {
                let tail = console.bootTail.suffix(8).joined(separator: " | ")
                throw MicroVMError(.backend, "the rig's QEMU exited before the command started\(stderr.isEmpty ? "" : ": \(stderr.suffix(1500))")\(tail.isEmpty ? "" : " (console: \(tail.suffix(1500)))")")
            }
            throw RigEnded(console: console.runTail, qemuStderr: stderr, output: output)
        }
    }

    /// The job script the rig's chroot runs: the caller's directory and environment, then the
    /// command. Everything is single-quoted, so no argument is ever interpreted by the shell.
    func writeJob(command: [String], scratchDir: String) throws {
        for p in [scratchDir] + shares + [options.workingDirectory] {
            guard p.hasPrefix("/"), !p.contains("\n") else {
                throw MicroVMError.invalidArgument("path '\(p)' must be absolute and free of newlines to be shared with the rig")
            }
        }
        var env: [String: String] = [:]
        for (k, v) in ProcessInfo.processInfo.environment where k.hasPrefix("MVM_") { env[k] = v }
        env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        env["HOME"] = "/tmp"
        env["TMPDIR"] = "/tmp"
        env["MVM_STATE_DIR"] = "/run/mvm-state"
        env[RigEnvironment.variable] = "1"
        env["MVM_RIG_SCRATCH"] = scratchDir
        if env["MVM_CACHE_DIR"] == nil { env["MVM_CACHE_DIR"] = options.paths.cache }
        if env["MVM_SOURCE_DIR"] == nil { env["MVM_SOURCE_DIR"] = Paths.sourceDirectory() }
        for (k, v) in options.environment { env[k] = v }
        var script = "#!/bin/sh\n"
        for (k, v) in env.sorted(by: { $0.key < $1.key }) {
            guard k.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "_" }), !k.isEmpty else {
                throw MicroVMError.invalidArgument("environment name '\(k)' is not a shell variable name")
            }
            script += "\(k)=\(ProcessRunner.shellQuote(v)); export \(k)\n"
        }
        script += "mkdir -p \"$MVM_STATE_DIR\"\n"
        script += "cd \(ProcessRunner.shellQuote(options.workingDirectory)) || { echo \"mvm rig: cannot enter \(ProcessRunner.shellQuote(options.workingDirectory).replacingOccurrences(of: "\"", with: "")) inside the rig (/tmp, /run and /var/tmp are fresh tmpfs there; pass --share)\"; exit 126; }\n"
        script += "exec " + command.map(ProcessRunner.shellQuote).joined(separator: " ") + "\n"
        try Data(script.utf8).write(to: URL(fileURLWithPath: scratchDir + "/job.sh"))
        try Data((scratchDir + "\n").utf8).write(to: URL(fileURLWithPath: scratchDir + "/path"))
        let lines = shares.enumerated().map { "rigshare\($0.offset) \($0.element)\n" }.joined()
        try Data(lines.utf8).write(to: URL(fileURLWithPath: scratchDir + "/shares"))
    }

    /// Directories the rig mounts fresh (tmpfs) over the host's: nothing of the host's shows there.
    static let maskedPrefixes = ["/tmp", "/run", "/var/tmp"]

    /// The caller's shares, plus the working directory when it lies under a masked prefix and no
    /// share covers it (a checkout under /tmp, as CI may use): shared read-write at its own path,
    /// so the command, the binaries built there and the sources are all visible inside.
    var shares: [String] {
        let wd = options.workingDirectory
        func under(_ path: String, _ dir: String) -> Bool { path == dir || path.hasPrefix(dir.hasSuffix("/") ? dir : dir + "/") }
        let masked = Self.maskedPrefixes.contains { under(wd, $0) }
        if masked && !options.shares.contains(where: { under(wd, $0) }) { return options.shares + [wd] }
        return options.shares
    }

    /// The start of a small file the rig's guest writes (its status, its heartbeat): at most 64
    /// bytes, however much the guest wrote.
    static func readSmall(_ path: String) -> String? {
        guard let h = FileHandle(forReadingAtPath: path) else { return nil }
        defer { try? h.close() }
        return (try? h.read(upToCount: 64)).map { String(decoding: $0, as: UTF8.self) }
    }

    /// QEMU option values separate on commas; a literal comma is written twice.
    static func qemuEscape(_ s: String) -> String { s.replacingOccurrences(of: ",", with: ",,") }

    static func makeScratch(name: String = "mvm-rig-scratch", mode: mode_t = 0o777) throws -> String {
        var template = Array((NSTemporaryDirectory() + "/\(name).XXXXXX").utf8CString)
        guard let p = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw MicroVMError(.permissionDenied, "cannot create the rig's scratch directory under \(NSTemporaryDirectory()): \(String(cString: strerror(errno)))")
        }
        let path = String(cString: p).replacingOccurrences(of: "//", with: "/")
        // The scratch share: 9p passthrough writes as the guest's uid; the guest runs as root, so
        // the share must admit it. Other directories keep mkdtemp's 0700 or get what they ask.
        chmod(path, mode)
        return path
    }
}
