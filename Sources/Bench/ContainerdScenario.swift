import Foundation
import MicroVMCore
import Host
import KVM
import DirectVMM
import Containers
#if canImport(Glibc)
import Glibc
#endif

/// The same rootfs through containerd, as Kubernetes runs a pod: containerd's runc shim
/// (`io.containerd.runc.v2`) with runc, gVisor's runsc or mvm-runtime as its runc-compatible
/// binary, which is what a RuntimeClass chooses between. It measures what a user of `ctr run`
/// waits for, and what an idle pod costs the host.
///
/// Each measurement starts a containerd of its own (its root, state and socket in a temporary
/// directory, stopped after), so it needs no running daemon and touches no one else's.
/// The targets are `runc`, `runsc`, and the VM mode mvm-runtime uses on this host (`direct`
/// where KVM is hardware or nested, `hosted` otherwise).
public struct ContainerdScenario: BenchScenario {
    public var tools: [String] { ["sh", "echo", "sleep"] }
    public let name = "containerd"
    public static let startExit = Metric("containerd-start-exit", "`ctr run --rm … echo up`: command → exit", unit: "ms", higherIsBetter: false)
    public static let firstOutput = Metric("containerd-first-output", "`ctr run --rm … echo up`: command → the container's first output", unit: "ms", higherIsBetter: false)
    public static let idlePSS = Metric("containerd-idle-pss", "Host memory (PSS) of an idle pod: its shim and everything under it", unit: "MiB", higherIsBetter: false)

    /// `ctr run` rounds per measurement.
    public var runs: Int
    /// Added to containerd's environment, which its shims and the runtimes inherit (mvm-runtime
    /// takes its state directory from MVM_STATE_DIR there).
    public var environment: [String: String]
    public init(runs: Int = 3, environment: [String: String] = [:]) { self.runs = max(1, runs); self.environment = environment }

    public func metrics(for ctx: BenchContext) -> [Metric] { [Self.startExit, Self.firstOutput, Self.idlePSS] }
    public func runsPerMeasure(_ ctx: BenchContext) -> Int { runs + 1 }
    public var needsBackend: Bool { false }
    public var note: String? {
        "containerd 1.6 and its runc shim with this target's runc-compatible binary (mvm-runtime for the VM mode it uses here), a containerd of "
            + "the bench's own; the workload's rootfs (read-only for runc and runsc, a disk of its own per container for mvm-runtime) and the "
            + "bench slice as the container's limits; times are the whole `ctr run` from spawn, PSS is the pod's shim and every process under it "
            + "(runtime, sandbox or VM), idle: the peak of three samples 1 s apart that agree within 2 %"
    }

    /// The runc-compatible binary for a target, or why the scenario does not run there.
    static func runtime(for target: String, kvm: KVMProbeResult.Verdict, linkDirectory: String) throws -> (binary: String, label: String) {
        switch target {
        case "runc":
            guard let b = ProcessRunner.which(target) else { throw ScenarioUnavailable("runc is not installed (apt-get install runc)") }
            return (b, target)
        case "runsc":
            guard let b = ProcessRunner.which(target) else { throw ScenarioUnavailable("runsc is not installed (apt-get install runsc)") }
            // Without a network, as mvm's runsc runs: through a wrapper the shim calls as its runc.
            let flag = ContainerRuntime.runscNetwork(sandbox: false)
            let wrapper = linkDirectory + "/runsc"
            try "#!/bin/sh\nexec \(ProcessRunner.shellQuote(b)) \(flag) \"$@\"\n".write(toFile: wrapper, atomically: true, encoding: .utf8)
            chmod(wrapper, 0o755)
            return (wrapper, "runsc \(flag)")
        case "hosted", "direct":
            let mode = BackendCatalog.runtimeVMMode(kvm: kvm)
            guard mode.rawValue == target else {
                throw ScenarioUnavailable("mvm-runtime runs its containers as \(mode.rawValue) VMs on this host: the containerd scenario measures it there")
            }
            guard let mvm = VMMProcess.companion("mvm", environment: "MVM_BINARY") else {
                throw ScenarioUnavailable("the mvm binary was not found (set MVM_BINARY): mvm-runtime is mvm under that name")
            }
            // mvm-runtime is mvm called by that name.
            let link = linkDirectory + "/mvm-runtime"
            unlink(link)
            guard symlink(mvm, link) == 0 else { throw MicroVMError(.backend, "cannot link \(link) to \(mvm): \(String(cString: strerror(errno)))") }
            return (link, "mvm-runtime (\(mode.rawValue) VMs)")
        default:
            throw ScenarioUnavailable("the containerd scenario runs on runc, runsc and \(BackendCatalog.runtimeVMMode(kvm: kvm).rawValue) (mvm-runtime)")
        }
    }

    /// The targets the scenario measures here: runc, runsc, and mvm-runtime's VM mode.
    public static func targets(kvm: KVMProbeResult.Verdict) -> [String] { ["runc", "runsc", BackendCatalog.runtimeVMMode(kvm: kvm).rawValue] }

    /// A pod's setting for one target: a containerd of its own, the runtime and the `ctr run`
    /// flags that give it the bench slice, for `body`; containerd and its directory go after.
    func withContainerd<T>(_ target: BenchTarget, _ ctx: BenchContext,
                           _ body: (_ daemon: PrivateContainerd, _ flags: [String], _ details: [String: String]) throws -> T) throws -> T {
        let host = HostProfile.current()
        let kvm = host.kvm.verdict
        // What the target's own backend needs, mvm-runtime's VMs included (libvirt, or a real KVM).
        if let why = BackendCatalog.unavailableReason(target.name, host: host) { throw ScenarioUnavailable(why) }
        guard ctx.workload.rootfsTree != "/" else { throw ScenarioUnavailable("containerd runs an image's rootfs, not the host's /: use --workload image") }
        for tool in ["containerd", "ctr"] where ProcessRunner.which(tool) == nil {
            throw ScenarioUnavailable("\(tool) is not installed (apt-get install containerd)")
        }
        let dir = FileManager.default.temporaryDirectory.path + "/mvm-bench-ctrd-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try Paths.ensureDirectory(dir)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (binary, label) = try Self.runtime(for: target.name, kvm: kvm, linkDirectory: dir)
        let daemon = try PrivateContainerd(directory: dir, environment: environment)
        defer { daemon.stop() }

        let acceleration = target.name == "runc" || target.name == "runsc" ? "none" : BackendCatalog.acceleration(mode: target.record.mode, kvm: kvm)
        let details = ["runtime": label, "acceleration": acceleration, "rootfs": ctx.workload.rootfsTree]
        // The slice as a container's limits, rendered as for every other container (quota over
        // the common period). A rootfs has no image config: the environment is PATH alone.
        let limits = Enforcement(slice: ctx.slice, mode: .container)
        var flags = ["--rootfs", "--runc-binary", binary, "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                     "--memory-limit", String(limits.memoryLimit.bytes),
                     "--cpu-period", String(Enforcement.period), "--cpu-quota", String(limits.quotaMicros)]
        // The tree is the workload every backend shares: runc and runsc get it read-only;
        // mvm-runtime copies it into a disk of the container's own.
        if target.name == "runc" || target.name == "runsc" { flags.append("--read-only") }
        return try body(daemon, flags, details)
    }

    public func measure(_ target: BenchTarget, _ ctx: BenchContext) async throws -> [Measurement] {
        try withContainerd(target, ctx) { daemon, flags, details in
            let timeout = ctx.durations.instanceTimeout
            var out: [Measurement] = []
            for i in 0..<runs {
                let id = "bench-\(getpid())-\(i)-\(UInt16.random(in: 0...UInt16.max))"
                let r = try daemon.timedRun(flags + [ctx.workload.rootfsTree, id, "echo", "up"], id: id, timeout: timeout)
                guard r.status == 0, r.output == "up\n" else {
                    throw MicroVMError(.backend, "ctr run with \(details["runtime"] ?? target.name) exited with status \(r.status), printing '\(r.output.suffix(300))' (\(r.errors.suffix(600)))")
                }
                out.append(Measurement(Self.startExit, r.exitMs, details: details))
                if let first = r.firstOutputMs { out.append(Measurement(Self.firstOutput, first, details: details)) }
            }
            out.append(try daemon.idlePodPSS(flags, rootfs: ctx.workload.rootfsTree, timeout: timeout, metric: Self.idlePSS, details: details))
            return out
        }
    }

    /// A target's entry in the audit: `containerd+` and the runtime containerd runs for it.
    public static func auditName(_ target: String) -> String {
        "containerd+" + (target == "runc" || target == "runsc" ? target : "mvm-runtime")
    }

    /// The isolation probe in a pod of this target's runtime, run as the timed runs are: what a
    /// container started by containerd sees, for the audit beside the bench's own instances.
    /// Named `containerd+RUNTIME` (runc, runsc, mvm-runtime).
    public func audit(_ target: BenchTarget, _ ctx: BenchContext, host: AuditHost = .current()) -> AuditEntry {
        let name = Self.auditName(target.name)
        do {
            return try withContainerd(target, ctx) { daemon, flags, _ in
                let id = "bench-audit-\(getpid())-\(UInt16.random(in: 0...UInt16.max))"
                let r = try daemon.timedRun(flags + [ctx.workload.rootfsTree, id] + IsolationAudit.command, id: id, timeout: ctx.durations.instanceTimeout)
                var e = AuditEntry.from(backend: name, output: r.output, exitStatus: r.status, host: host)
                if e.status == .failed, !r.errors.isEmpty { e.note = (e.note ?? "") + "; ctr: " + r.errors.suffix(600) }
                return e
            }
        } catch let u as ScenarioUnavailable {
            return AuditEntry(backend: name, status: .unavailable, note: u.reason)
        } catch {
            return AuditEntry(backend: name, status: .failed, note: "probe through containerd failed: \(error)")
        }
    }
}

/// A containerd of the bench's own: root, state and socket in one directory, stopped (with what
/// it started) by `stop`.
final class PrivateContainerd: Sendable {
    let directory: String
    let socket: String
    let process: ChildProcess

    init(directory: String, environment: [String: String] = [:]) throws {
        self.directory = directory
        socket = directory + "/containerd.sock"
        let config = """
            version = 2
            root = "\(directory)/root"
            state = "\(directory)/state"
            disabled_plugins = ["io.containerd.grpc.v1.cri"]
            [grpc]
              address = "\(socket)"
            """
        try config.write(toFile: directory + "/containerd.toml", atomically: true, encoding: .utf8)
        let log = open(directory + "/containerd.log", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        defer { if log >= 0 { close(log) } }
        process = try ChildProcess(["containerd", "--config", directory + "/containerd.toml"],
                                   stdout: log >= 0 ? .descriptor(log) : .null, stderr: log >= 0 ? .descriptor(log) : .null,
                                   environment: environment, package: "containerd")
        let deadline = Date().addingTimeInterval(30)
        while (try? ctr(["version"], timeout: 5))?.status != 0 {
            guard Date() < deadline, process.wait(upTo: 0.1) == nil else {
                stop()
                let tail = (try? String(contentsOfFile: directory + "/containerd.log", encoding: .utf8))?.suffix(600) ?? ""
                throw MicroVMError(.backend, "the bench's containerd did not answer on \(socket) within 30 s: \(tail)")
            }
        }
    }

    func ctr(_ args: [String], timeout: Double = 60) throws -> ProcessRunner.Output {
        try ProcessRunner.run(["ctr", "-a", socket] + args, timeout: timeout, package: "containerd")
    }

    struct TimedRun { var status: Int32; var output: String; var errors: String; var exitMs: Double; var firstOutputMs: Double? }

    /// `ctr run ARGS`, timed from spawn to its first output byte and to its exit; a run past
    /// `timeout` is killed (with its task) and an error.
    func timedRun(_ runArgs: [String], id: String, timeout: Double) throws -> TimedRun {
        var out: [Int32] = [-1, -1], err: [Int32] = [-1, -1]
        guard pipe(&out) == 0 else { throw MicroVMError(.internalError, "pipe: \(String(cString: strerror(errno)))") }
        guard pipe(&err) == 0 else { close(out[0]); close(out[1]); throw MicroVMError(.internalError, "pipe: \(String(cString: strerror(errno)))") }
        for fd in out + err { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        let t0 = Monotonic.seconds()
        let child: ChildProcess
        do {
            child = try ChildProcess(["ctr", "-a", socket, "run", "--rm"] + runArgs, stdout: .descriptor(out[1]), stderr: .descriptor(err[1]), package: "containerd")
        } catch {
            for fd in out + err { close(fd) }
            throw error
        }
        close(out[1]); close(err[1])
        defer { close(out[0]); close(err[0]) }
        var output: [UInt8] = [], errors: [UInt8] = []
        var first: Double?
        var open = [out[0], err[0]]
        var buf = [UInt8](repeating: 0, count: 4096)
        while !open.isEmpty {
            let left = t0 + timeout - Monotonic.seconds()
            guard left > 0 else {
                child.signal(SIGKILL); _ = child.wait()
                removeContainer(id)
                throw MicroVMError(.timeout, "ctr run did not end within \(Int(timeout)) s")
            }
            var fds = open.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            guard poll(&fds, nfds_t(fds.count), Int32(min(left, 1) * 1000)) >= 0 || errno == EINTR else { break }
            for p in fds where p.revents != 0 {
                let n = read(p.fd, &buf, buf.count)
                if n <= 0 { open.removeAll { $0 == p.fd }; continue }
                if p.fd == out[0] {
                    if first == nil { first = (Monotonic.seconds() - t0) * 1000 }
                    if output.count < 1 << 16 { output += buf[0..<n] }
                } else if errors.count < 1 << 16 {
                    errors += buf[0..<n]
                }
            }
        }
        let (status, timedOut) = child.wait(timeout: max(1, t0 + timeout - Monotonic.seconds()))
        let exitMs = (Monotonic.seconds() - t0) * 1000
        guard !timedOut else {
            child.signal(SIGKILL); _ = child.wait()
            removeContainer(id)
            throw MicroVMError(.timeout, "ctr run closed its output but did not exit within \(Int(timeout)) s")
        }
        return TimedRun(status: status, output: String(decoding: output, as: UTF8.self), errors: String(decoding: errors, as: UTF8.self),
                        exitMs: exitMs, firstOutputMs: first)
    }

    /// An idle pod's host memory: `ctr run -d` of a sleep, then the summed PSS of the pod's shim
    /// and every process under it, once a second, until three samples in a row lie within 2 %
    /// (or 1 MiB) of each other: the pod has started and settled (a VM has booted; mvm-runtime
    /// passes a VM's output on only at its end, so there is no output to wait for). The peak of
    /// those three is the figure; a pod that never settles within `timeout` is an error.
    func idlePodPSS(_ flags: [String], rootfs: String, timeout: Double, metric: Metric, details: [String: String]) throws -> Measurement {
        let id = "bench-idle-\(getpid())-\(UInt16.random(in: 0...UInt16.max))"
        defer { removeContainer(id) }
        let started = try ctr(["run", "-d", "--null-io"] + flags + [rootfs, id, "sleep", "3600"], timeout: timeout)
        guard started.status == 0 else {
            throw MicroVMError(.backend, "ctr run -d failed (\(started.status)): \(started.stderrText.suffix(600))")
        }
        let t0 = Date()
        var window: [UInt64] = [], count = 0
        while true {
            usleep(1_000_000)
            let table = ProcessMemory.table()
            guard let shim = table.values.first(where: { $0.cmdline.contains("-id \(id) ") && $0.cmdline.contains("containerd-shim") }) else {
                throw MicroVMError(.backend, "the idle pod \(id) has no containerd shim: it ended (\((try? ctr(["task", "ls"], timeout: 10))?.stdoutText ?? ""))")
            }
            let pod = ProcessMemory.tree(of: [shim.pid], table: table)
            window = (window + [ProcessMemory.pss(of: pod)]).suffix(3)
            count = pod.count
            if window.count == 3, let lo = window.min(), let hi = window.max(), hi - lo <= max(1 << 20, hi / 50), Date().timeIntervalSince(t0) >= 3 { break }
            guard Date().timeIntervalSince(t0) < timeout else {
                throw MicroVMError(.timeout, "the idle pod's memory did not settle within \(Int(timeout)) s (last samples \(window.map { $0 >> 20 }) MiB)")
            }
        }
        return Measurement(metric, Double(window.max() ?? 0) / 1_048_576,
                           details: details.merging(["processes": "\(count)", "settled_after_s": String(format: "%.0f", Date().timeIntervalSince(t0))]) { $1 })
    }

    /// Kills a container's task and deletes it and the container, whatever state they are in.
    func removeContainer(_ id: String) {
        _ = try? ctr(["task", "kill", "-s", "SIGKILL", id], timeout: 30)
        // `task delete` fails while the killed task is still stopping: until it is gone, up to 30 s.
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline, (try? ctr(["task", "delete", id], timeout: 30))?.status != 0, taskExists(id) { usleep(200_000) }
        _ = try? ctr(["container", "delete", id], timeout: 30)
    }

    func taskExists(_ id: String) -> Bool {
        (try? ctr(["task", "ls", "-q"], timeout: 10))?.stdoutText.split(separator: "\n").contains(Substring(id)) == true
    }

    /// Stops containerd: what it still runs first, then the daemon itself.
    func stop() {
        if let tasks = try? ctr(["task", "ls", "-q"], timeout: 10), tasks.status == 0 {
            for id in tasks.stdoutText.split(separator: "\n") where !id.isEmpty { removeContainer(String(id)) }
        }
        if let cs = try? ctr(["container", "ls", "-q"], timeout: 10), cs.status == 0 {
            for id in cs.stdoutText.split(separator: "\n") where !id.isEmpty { _ = try? ctr(["container", "delete", String(id)], timeout: 30) }
        }
        process.signal(SIGTERM)
        if process.wait(upTo: 10) == nil { process.signal(SIGKILL); _ = process.wait() }
        // containerd mounts nothing under its root for --rootfs containers, but a killed shim
        // may leave its bundle's rootfs mount behind: unmount anything under the directory.
        if let mounts = readWholeText("/proc/self/mounts") {
            for line in mounts.split(separator: "\n").reversed() {
                let f = line.split(separator: " ")
                if f.count > 1, f[1].hasPrefix(directory + "/") { _ = umount2(String(f[1]), Int32(MNT_DETACH)) }
            }
        }
    }
}
