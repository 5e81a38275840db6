import Foundation
import LinuxBoot
import MicroVMCore
import Synchronization
import VMM
import Host
import Jail
import VMMAPI

/// A direct VM in a process of its own: `mvm run`, the bench and library callers start
/// `mvm-vmm` with the launch plan as a Firecracker configuration document, as a jailer starts
/// Firecracker. The VMM joins the instance's cgroup (the slice's enforcement) before it creates
/// the VM, dies with the process that started it, serves the API on the instance's socket
/// (`mvm pause`, `resume`, `stats`, and Ctrl-Alt-Del for `mvm stop`), writes the console to the
/// instance's (bounded) log and, at exit, its milestones on the host's monotonic clock.
public enum VMMProcess {
    /// `MVM_VMM`, else `mvm-vmm` beside the running executable, else the package's build folders.
    static func binary() -> String? { companion("mvm-vmm", environment: "MVM_VMM") }

    /// One of the package's executables: the path in `environment` when set, else beside the
    /// running executable, else in the package's build folders.
    public static func companion(_ name: String, environment: String) -> String? {
        if let env = ProcessInfo.processInfo.environment[environment] { return FileManager.default.isExecutableFile(atPath: env) ? env : nil }
        var candidates: [String] = []
        if let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe") {
            candidates.append((exe as NSString).deletingLastPathComponent + "/" + name)
        }
        let src = Paths.sourceDirectory()
        candidates += [src + "/.build/release/" + name, src + "/.build/debug/" + name]
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// The plan as `mvm-vmm` reads it. The command line is the plan's; the VMM adds its devices'.
    static func configuration(_ plan: LaunchPlan, kernel: String, tap: String?) -> VMConfiguration {
        let spec = plan.spec
        var c = VMConfiguration()
        c.machineConfig = MachineConfig(vcpuCount: spec.cpus, memSizeMib: Int(spec.memory.bytes >> 20),
                                        hugePages: plan.enforcement.hugePages ? "2M" : nil)
        c.bootSource = BootSource(kernelImagePath: kernel, initrdPath: plan.initrd, bootArgs: plan.cmdline)
        c.drives = plan.disks.enumerated().map { i, d in Drive(driveId: "disk\(i)", pathOnHost: d.path, isReadOnly: d.readOnly) }
        if let tap { c.networkInterfaces = [NetworkInterface(ifaceId: "eth0", hostDevName: tap)] }
        if let cid = spec.vsockCID { c.vsock = Vsock(guestCid: cid, udsPath: "") }
        if let b = spec.balloon {
            c.balloon = Balloon(amountMib: Int(b.amount.bytes >> 20), deflateOnOom: b.deflateOnOOM, statsPollingIntervalS: b.statsInterval,
                                freePageReporting: b.freePageReporting)
        }
        c.vcpuPins = plan.enforcement.vcpuPins.isEmpty ? nil : plan.enforcement.vcpuPins
        return c
    }

    /// The files a run writes beside its console log for the VMM (its configuration, its
    /// milestones), removed when it ends, or by whoever finds its record stale.
    static func runFiles(in directory: String) -> (config: String, timings: String) {
        (directory + "/vmm.json", directory + "/vmm-timings.json")
    }

    struct Outcome {
        var status: Int32
        /// The run outlived its time and was stopped.
        var timedOut: Bool
        var stderr: String
        var milestones: [String: Double]
    }

    /// How long a guest has to end after a Ctrl-Alt-Del before its VMM is stopped.
    public static let stopGrace: Double = 5

    /// Runs the VMM to its end. When the task is cancelled (`mvm stop`, a signal to `mvm run`)
    /// the guest gets a Ctrl-Alt-Del through the API and `stopGrace` seconds to reset, then the
    /// VMM a SIGTERM, then a SIGKILL after 10 s; on `timeout` the SIGTERM comes at once.
    /// `started` gets its pid once it runs.
    ///
    /// `jailed` starts it as pid 1 of a PID namespace of its own, with its uid and gid in the
    /// jail (`Jail.uid(for: name)`); it enters the rest of the jail itself once the machine is
    /// built. Either way it holds a lifeline: a pipe whose write end only this process holds,
    /// whose hang-up (this process gone, however) ends the VMM.
    static func run(binary: String, configuration: VMConfiguration, directory: String, name: String, logPath: String,
                    apiSocket: String, cgroups: [String] = [], devicePath: String = "/dev/kvm", allowEmulatedKVM: Bool, timeout: Double,
                    jailed: Bool = false, started: @Sendable (Int32) -> Void) async throws -> Outcome {
        let (configFile, timings) = runFiles(in: directory)
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys]
        try Paths.writeScratch(try enc.encode(configuration), to: configFile)
        defer { unlink(configFile); unlink(timings) }
        let id = Jail.uid(for: name)
        let arguments = [binary, "--config-file", configFile, "--api-sock", apiSocket, "--id", name, "--console-log", logPath,
                         "--timings-file", timings, "--attached", "--lifeline", "3", "--kvm-device", devicePath] + cgroups.flatMap { ["--cgroup", $0] }
            + (ProcessInfo.processInfo.environment["MVM_CONSOLE_LOG_MAX"].map { ["--console-log-max", $0] } ?? [])
            + (jailed ? ["--jail-uid", String(id), "--jail-gid", String(id)] : [])
        // A jailed VMM cannot remove its socket: it no longer sees the path.
        defer { if jailed { unlink(apiSocket) } }
        // posix_spawn with close-on-exec pipes and a pidfd (ChildProcess): the exit is seen the
        // moment it happens, and no other child inherits the VMM's stderr or its lifeline.
        let err = try ProcessRunner.makePipe()
        let lifeline: (read: Int32, write: Int32)
        do { lifeline = try ProcessRunner.makePipe() } catch { close(err.read); close(err.write); throw error }
        defer { close(lifeline.write) }
        let child: ChildProcess
        do {
            child = try ChildProcess(arguments, stderr: .descriptor(err.write),
                                     environment: ["MVM_DIRECT_ALLOW_EMULATED": allowEmulatedKVM ? "1" : "0"],
                                     inherit: [lifeline.read], newPIDNamespace: jailed)
        } catch {
            close(err.read); close(err.write); close(lifeline.read)
            throw MicroVMError(.backend, "cannot start \(binary): \(error)")
        }
        close(err.write)
        close(lifeline.read)
        // Its stderr, the first 64 KiB kept, read to the end on a thread of its own.
        let errors = Mutex(Data())
        let drained = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            var buf = [UInt8](repeating: 0, count: 4096)
            while true {
                let n = buf.withUnsafeMutableBytes { read(err.read, $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }
                errors.withLock { if $0.count < 64 << 10 { $0.append(contentsOf: buf[0..<n]) } }
            }
            close(err.read)
            drained.signal()
        }
        started(child.pid)
        let stop: @Sendable () -> Void = {
            child.signal(SIGTERM)
            DispatchQueue.global().asyncAfter(deadline: .now() + 10) { child.signal(SIGKILL) }
        }
        let stopGracefully: @Sendable () -> Void = {
            DispatchQueue.global().async {
                let t0 = Monotonic.seconds()
                // Pressed again every 1.5 s of the grace, as a person would: a press while the
                // guest's driver has the keyboard interrupt off is only seen with the next one.
                var asked = false, pressed = -Double.infinity
                while child.isRunning && Monotonic.seconds() < t0 + stopGrace {
                    if Monotonic.seconds() - pressed >= 1.5 {
                        pressed = Monotonic.seconds()
                        let ok = pressCtrlAltDel(apiSocket: apiSocket)
                        asked = asked || ok
                        if !asked { break }
                    }
                    _ = child.wait(upTo: 0.02)
                }
                let said = !asked ? "the VMM took no Ctrl-Alt-Del; stopping it"
                    : child.isRunning ? "Ctrl-Alt-Del sent; the guest did not reset within \(Int(stopGrace)) s; stopping its VMM"
                    : String(format: "Ctrl-Alt-Del sent; the guest reset after %.2f s", Monotonic.seconds() - t0)
                FileHandle.standardError.write(Data("mvm: \(name): \(said)\n".utf8))
                if child.isRunning { stop() }
            }
        }
        let timedOut = Atomic<Bool>(false)
        let timer = DispatchSource.makeTimerSource(queue: .global())
        timer.schedule(deadline: .now() + timeout)
        timer.setEventHandler { timedOut.store(true, ordering: .relaxed); stop() }
        timer.resume()
        defer { timer.cancel() }
        // The wait blocks: on a thread of its own, off Swift's cooperative pool.
        let status = await withTaskCancellationHandler {
            await withCheckedContinuation { (c: CheckedContinuation<Int32, Never>) in
                Thread.detachNewThread { c.resume(returning: child.wait().status) }
            }
        } onCancel: {
            stopGracefully()
        }
        // Whatever the VMM left in its stderr; a grandchild cannot hold the pipe (close-on-exec).
        _ = drained.wait(timeout: .now() + 5)
        let text = String(decoding: errors.withLock { $0 }, as: UTF8.self)
        let milestones = FileManager.default.contents(atPath: timings).flatMap { try? JSONDecoder().decode([String: Double].self, from: $0) } ?? [:]
        return Outcome(status: status, timedOut: timedOut.load(ordering: .relaxed), stderr: text, milestones: milestones)
    }

    /// Asks the VMM over its API for a Ctrl-Alt-Del; whether it took the request.
    static func pressCtrlAltDel(apiSocket: String) -> Bool {
        (try? APIClient(socketPath: apiSocket).send("PUT", "/actions", body: #"{"action_type": "SendCtrlAltDel"}"#))?.status == 204
    }

    /// Whether a VMM can be jailed on this host, found by doing it: `mvm-vmm --seccomp-check`
    /// in a PID namespace of its own enters the whole jail, and a confined vCPU thread then
    /// makes a call its filter forbids; the VMM must die of SIGSYS, naming the call.
    public static func jailCheck() -> Capability {
        if let why = Jail.unavailableReason() { return Capability(usable: false, detail: why, fix: "run as root, or run direct VMs with --no-jail") }
        guard let binary = binary() else { return Capability(usable: false, detail: "mvm-vmm not found", fix: "build it: swift build --product mvm-vmm") }
        do {
            let err = try ProcessRunner.makePipe()
            let id = Jail.uid(for: "doctor")
            let child: ChildProcess
            do {
                child = try ChildProcess([binary, "--jail-uid", String(id), "--jail-gid", String(id), "--seccomp-check", "vcpu"],
                                         stderr: .descriptor(err.write), newPIDNamespace: true)
            } catch { close(err.read); close(err.write); throw error }
            close(err.write)
            let status = child.wait(timeout: 10).status
            var bytes = [UInt8](repeating: 0, count: 4096), used = 0
            while used < bytes.count {
                let n = bytes.withUnsafeMutableBytes { read(err.read, $0.baseAddress! + used, $0.count - used) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }
                used += n
            }
            close(err.read)
            let said = String(decoding: bytes[..<used], as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
            guard status == 128 + SIGSYS, said.contains("seccomp") else {
                return Capability(usable: false, detail: "the jail check ended with status \(status): \(said)", fix: "run direct VMs with --no-jail until this is fixed")
            }
            return Capability(usable: true, detail: "direct VMMs run jailed: own PID, mount, IPC and UTS namespaces, an empty root, uid \(Jail.idBase)+, no capabilities, seccomp per thread (a forbidden call ends the VMM with SIGSYS)")
        } catch {
            return Capability(usable: false, detail: "cannot run the jail check: \(error)")
        }
    }
}
