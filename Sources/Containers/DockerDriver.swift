import Foundation
import MicroVMCore
import Host
import Allocator
#if canImport(Glibc)
import Glibc
#endif

/// The Docker path: the same rootfs imported once as `microvm-rootfs:<hash>` (no registry is
/// needed), run with `docker run --rm` under the same slice as the runc path.
struct DockerDriver: Sendable {
    var paths: Paths
    var tarball: String?

    static let ownerLabel = "microvm.owner"

    func docker(_ args: [String], timeout: Double = 120) throws -> ProcessRunner.Output {
        try ProcessRunner.run(["docker"] + args, timeout: timeout, package: "docker.io")
    }

    func requireDaemon() throws {
        let out = try docker(["version", "--format", "{{.Server.Version}}"], timeout: 20)
        guard out.status == 0 else {
            throw MicroVMError(.unsupported, "the Docker engine is not running: start it with 'dockerd --iptables=false --bridge=none &' (\(out.stderrText.trimmingCharacters(in: .whitespacesAndNewlines).prefix(200)))")
        }
    }

    /// The tag for a rootfs: a hash of the source's path, size and modification time, so a
    /// rebuilt image gets a new tag and an unchanged one is imported once.
    func imageTag(rootfs: String) -> (tag: String, source: String, isTarball: Bool) {
        let sibling = (rootfs as NSString).deletingLastPathComponent + "/rootfs.tar"
        let tar = tarball ?? (FileManager.default.fileExists(atPath: sibling) ? sibling : nil)
        let src = tar ?? rootfs
        let attrs = try? FileManager.default.attributesOfItem(atPath: src)
        let size = (attrs?[.size] as? NSNumber)?.uint64Value ?? 0
        let mtime = (attrs?[.modificationDate] as? Date)?.timeIntervalSince1970 ?? 0
        return ("microvm-rootfs:" + shortDigest("\(src)|\(size)|\(mtime)"), src, tar != nil)
    }

    func ensureImage(rootfs: String) throws -> String {
        let t = imageTag(rootfs: rootfs)
        if try docker(["image", "inspect", "--format", "{{.Id}}", t.tag], timeout: 30).status == 0 { return t.tag }
        let out: ProcessRunner.Output
        if t.isTarball {
            out = try docker(["import", t.source, t.tag], timeout: 600)
        } else {
            out = try ProcessRunner.run(["sh", "-c", "tar -C \"$1\" -cf - . | docker import - \"$2\"", "sh", t.source, t.tag], timeout: 600)
        }
        guard out.status == 0 else {
            throw MicroVMError(.backend, "docker import of '\(t.source)' failed: \(out.stderrText.trimmingCharacters(in: .whitespacesAndNewlines).suffix(1000))")
        }
        return t.tag
    }

    /// The Docker network that instances with a `VMSpec.net` join: a user-defined bridge (veth
    /// pairs on a Linux bridge, Docker's own network path), the host at its gateway address.
    /// It is made on first use and kept, like Docker's default bridge.
    static let networkName = "mvm"
    static let networkSubnet = "10.202.0.0/24"
    static let networkGateway = "10.202.0.1"

    func ensureNetwork() throws {
        if try docker(["network", "inspect", "--format", "{{.Id}}", Self.networkName], timeout: 30).status == 0 { return }
        let out = try docker(["network", "create", "--driver", "bridge", "--subnet", Self.networkSubnet, "--gateway", Self.networkGateway,
                              "-o", "com.docker.network.bridge.name=mvmbr0", Self.networkName], timeout: 60)
        // Another run may have made it in the meantime (its error then says so, or names the pool).
        guard out.status != 0 else { return }
        let madeElsewhere = try docker(["network", "inspect", "--format", "{{.Id}}", Self.networkName], timeout: 30).status == 0
        guard madeElsewhere else {
            throw MicroVMError(.backend, "cannot create the Docker network '\(Self.networkName)' (\(Self.networkSubnet)): \(out.stderrText.trimmingCharacters(in: .whitespacesAndNewlines).prefix(500)); remove what holds that subnet or run without a network")
        }
    }

    /// The `docker run` flags of an enforcement, meaning what the OCI path writes to config.json:
    /// the CPU cap as a quota over the same period, the memory limit with no swap beyond it.
    public static func resourceFlags(_ e: Enforcement) -> [String] {
        var f: [String] = []
        if !e.cpuSet.isEmpty { f += ["--cpuset-cpus", CPUList.format(e.cpuSet)] }
        if let n = e.numaNode { f += ["--cpuset-mems", String(n)] }
        f += ["--cpu-period", "\(Enforcement.period)", "--cpu-quota", "\(e.quotaMicros)"]
        f += ["--cpu-shares", String(CgroupSet.shares(weight: e.cpuWeight))]
        if e.memoryLimit.bytes > 0 { f += ["--memory", "\(e.memoryLimit.bytes)b", "--memory-swap", "\(e.memoryLimit.bytes)b"] }
        if let p = e.pidsLimit { f += ["--pids-limit", String(p)] }
        return f
    }

    func run(_ plan: LaunchPlan, rootfs: String, cancelled: @escaping @Sendable () -> Bool = { false }) throws -> RunResult {
        let spec = plan.spec
        let id = try ContainerBackend.containerID(name: spec.name)
        try requireDaemon()
        reapOrphans()
        let image = try ensureImage(rootfs: rootfs)
        let store = ContainerStore(paths: paths)
        try Paths.ensureDirectory(store.logs)
        let hasShell = (try? FileManager.default.attributesOfItem(atPath: rootfs + "/bin/sh")) != nil
        let command = hasShell ? ["/bin/sh", "-c", "echo @@mvm:container-started@@; exec \"$@\"", "mvm"] + spec.command : spec.command
        let me = getpid()
        var args = ["run", "--rm", "--name", id, "--hostname", spec.name,
                    "--label", "\(Self.ownerLabel)=\(me):\(ProcessIdentity.startTime(pid: me) ?? 0)",
                    "--read-only", "--tmpfs", "/tmp", "--security-opt", "no-new-privileges"]
        for b in try ContainerBackend.diskBinds(spec.disks) {
            args += ["--volume", "\(b.source):\(b.destination)\(b.readOnly ? ":ro" : "")"]
        }
        if let net = spec.net {
            guard net.tap == nil, net.hostAddress == nil || HostLinks.address(net.hostAddress!) == Self.networkGateway else {
                throw MicroVMError.invalidArgument("Docker containers join the '\(Self.networkName)' bridge network (host \(Self.networkGateway)): drop the tap name and host address from --net")
            }
            try ensureNetwork()
            args += ["--network", Self.networkName]
            if let g = net.guestAddress { args += ["--ip", HostLinks.address(g)] }
        } else {
            args += ["--network", "none"]
        }
        args += Self.resourceFlags(plan.enforcement)
        for e in spec.environment ?? [] { args += ["--env", e] }
        if let dir = spec.workingDirectory { args += ["--workdir", dir] }
        args += [image] + command
        guard let exe = ProcessRunner.which("docker") else { throw MicroVMError.notFound("'docker' is not installed: apt-get install docker.io") }
        let launched = try StreamedRun.run(executable: exe, arguments: args, logPath: store.log(id), expectMarker: hasShell,
                                           timeout: spec.timeout, clock: plan.clock, cancelled: cancelled,
                                           onStart: { [holder = plan.holder] in
                                               // dockerd's child, not ours: the grant follows the container's init.
                                               if let out = try? ProcessRunner.run([exe, "inspect", "--format", "{{.State.Pid}}", id], timeout: 15),
                                                  out.status == 0, let pid = Int32(out.stdoutText.trimmingCharacters(in: .whitespacesAndNewlines)), pid > 0 {
                                                   holder(pid, "docker container init")
                                               }
                                           },
                                           onTimeout: { _ = try? ProcessRunner.run([exe, "rm", "-f", id], timeout: 30) })
        _ = launched.collector.finish(timeout: 10)
        let r = launched.collector.result
        if launched.timedOut {
            _ = try? docker(["rm", "-f", id], timeout: 30)
            throw MicroVMError(.timeout, "container '\(spec.name)' ran past its \(spec.timeout) s timeout and was removed")
        }
        // docker run's own failures are 125 (daemon), 126 (cannot invoke), 127 (not found).
        if !r.sawMarker && hasShell && (125...127).contains(launched.status) {
            throw MicroVMError(.backend, "docker could not start container '\(spec.name)' (status \(launched.status)): \(r.stderr.trimmingCharacters(in: .whitespacesAndNewlines).suffix(2000))")
        }
        let console = (try? String(contentsOfFile: store.log(id), encoding: .utf8)) ?? ""
        if let started = launched.collector.startedAt {
            plan.clock.mark(.firstInstruction, at: started)
            plan.clock.mark(.ready, at: started)
        }
        return plan.result(status: launched.status, output: r.stdout + r.stderr, console: console)
    }

    struct Listed: Decodable { var ID: String; var Names: String; var Labels: String; var State: String }

    func listed() -> [Listed] {
        guard let out = try? docker(["ps", "-a", "--filter", "label=\(Self.ownerLabel)", "--format", "{{json .}}"], timeout: 30),
              out.status == 0 else { return [] }
        return out.stdoutText.split(separator: "\n").compactMap { try? JSONDecoder().decode(Listed.self, from: Data($0.utf8)) }
    }

    static func ownerAlive(labels: String) -> Bool {
        guard let kv = labels.split(separator: ",").first(where: { $0.hasPrefix(ownerLabel + "=") }) else { return false }
        let v = kv.dropFirst(ownerLabel.count + 1).split(separator: ":")
        guard v.count == 2, let pid = Int32(v[0]), let ticks = UInt64(v[1]) else { return false }
        return ProcessIdentity.isAlive(pid: pid, startTime: ticks)
    }

    /// Removes our Docker containers whose `mvm` died (`--rm` only fires when the client lives).
    func reapOrphans() {
        for c in listed() where !Self.ownerAlive(labels: c.Labels) {
            _ = try? docker(["rm", "-f", c.ID], timeout: 30)
        }
    }

    /// Our containers, after removing those whose `mvm` died: one `docker ps`, then one
    /// `docker inspect` for the live ones' init pid and limits (as `docker update` left them).
    func list() -> [InstanceInfo] {
        var out: [InstanceInfo] = []
        var live: [String] = []
        for c in listed() {
            guard Self.ownerAlive(labels: c.Labels) else {
                _ = try? docker(["rm", "-f", c.ID], timeout: 30)
                continue
            }
            live.append(c.ID)
            out.append(InstanceInfo(name: String(c.Names.hasPrefix("mvm-") ? c.Names.dropFirst(4) : Substring(c.Names)), mode: .container,
                                    state: c.State, cpus: 0, memory: 0, note: "docker"))
        }
        guard !live.isEmpty, let inspected = try? docker(["inspect", "--format",
                                                          "{{.Name}} {{.State.Pid}} {{.HostConfig.CpuQuota}} {{.HostConfig.CpuPeriod}} {{.HostConfig.Memory}}"] + live,
                                                         timeout: 30), inspected.status == 0 else { return out }
        for line in inspected.stdoutText.split(separator: "\n") {
            let f = line.split(separator: " ").map(String.init)
            guard f.count == 5, let i = out.firstIndex(where: { "/mvm-" + $0.name == f[0] }) else { continue }
            if let pid = Int32(f[1]), pid > 0 { out[i].pid = pid }
            if let quota = Double(f[2]), let period = Double(f[3]), quota > 0, period > 0 { out[i].cpus = Int((quota / period).rounded(.up)) }
            if let bytes = UInt64(f[4]), bytes > 0 { out[i].memory = ByteCount(bytes) }
        }
        return out
    }

    /// Whether `id` is a Docker container of ours.
    func knows(_ id: String) -> Bool {
        guard ProcessRunner.which("docker") != nil,
              let out = try? docker(["inspect", "--format", "{{index .Config.Labels \"\(Self.ownerLabel)\"}}", id], timeout: 30) else { return false }
        return out.status == 0 && !out.stdoutText.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty
    }

    /// `docker update` with the flags `docker run` took for the same enforcement (no pids:
    /// the limit does not change with a resize).
    func update(id: String, to e: Enforcement) throws {
        var limits = e
        limits.pidsLimit = nil
        let out = try docker(["update"] + Self.resourceFlags(limits) + [id], timeout: 60)
        guard out.status == 0 else {
            throw MicroVMError(.backend, "docker update of \(id) failed: \(out.stderrText.trimmingCharacters(in: .whitespacesAndNewlines).prefix(500)); nothing was changed")
        }
    }

    func stop(id: String) throws {
        let out = try docker(["stop", "-t", "5", id], timeout: 30)
        guard out.status == 0 else {
            throw MicroVMError.notFound("no Docker container '\(id)': \(out.stderrText.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
    }
}
