/// Containers: runs a `VMSpec` as an OCI container (runc, or crun where the host's cgroup layout
/// allows) or through Docker, from the same rootfs tree the guest image is made of, inside the
/// allocator's `ResourceSlice` (cgroups), with seccomp, dropped capabilities and a read-only root.
/// Nothing outlives a run: a reaper removes containers whose `mvm` died mid-run.
///
/// ```swift
/// let backend = ContainerBackend(runtime: .runc)
/// let spec = VMSpec(name: "demo", command: ["sh", "-c", "echo hello; exit 3"],
///                   rootfs: try ImageStore().ensureDefault().rootfsTree,
///                   slice: ResourceSlice(cpus: 1, memory: .mebibytes(64), pidsLimit: 64))
/// let result = try await backend.run(spec)   // exitStatus 3, output "hello\n"
/// ```
import Foundation
import Synchronization
import MicroVMCore
import Host
import Launch
import Allocator
#if canImport(Glibc)
import Glibc
#endif

public struct ContainerBackend: InstanceBackend {
    public var mode: RunMode { .container }
    /// Where a Docker container with a network reaches the host: the gateway of the bridge
    /// network it joins (runc containers get a veth /30 of their own instead).
    public static let dockerNetworkHost = DockerDriver.networkGateway
    /// Where a container sees its `--disk`: a host directory bind-mounted here (a container has no
    /// block devices of its own; the image tree already has this directory, so nothing is created in it).
    public static let diskMountPoint = "/mnt"

    /// The bind mount for a container's disk: at most one, a directory.
    static func diskBinds(_ disks: [DiskSpec]) throws -> [(source: String, destination: String, readOnly: Bool)] {
        guard disks.count <= 1 else {
            throw MicroVMError.invalidArgument("a container takes one --disk (a host directory, bind-mounted at \(diskMountPoint)); got \(disks.count)")
        }
        return try disks.map { d in
            var isDir: ObjCBool = false
            guard FileManager.default.fileExists(atPath: d.path, isDirectory: &isDir), isDir.boolValue else {
                throw MicroVMError.invalidArgument("container mode mounts a host directory as its disk, and '\(d.path)' is not one: pass a directory (it appears at \(diskMountPoint)), or use a VM mode for a raw disk image")
            }
            return (d.path, diskMountPoint, d.readOnly)
        }
    }
    public var runtime: ContainerRuntime
    /// Tasks gVisor's own sandbox (sentry, gofer) needs inside a container's pids limit.
    public static let runscSandboxTasks = 256
    public var paths: Paths
    /// The rootfs used when a spec names none (e.g. `{ try ImageStore().ensureDefault().rootfsTree }`).
    public var defaultRootfs: (@Sendable () throws -> String)?
    /// Docker only: a tarball of the rootfs to import (else the tree's sibling `rootfs.tar`,
    /// else the tree is packed on the fly).
    public var rootfsTarball: String?

    public init(runtime: ContainerRuntime = .automatic, paths: Paths = .default,
                rootfsTarball: String? = nil, defaultRootfs: (@Sendable () throws -> String)? = nil) {
        self.runtime = runtime; self.paths = paths; self.rootfsTarball = rootfsTarball; self.defaultRootfs = defaultRootfs
    }

    var store: ContainerStore { ContainerStore(paths: paths) }

    /// The container id for an instance name; names are checked so they are safe in paths,
    /// cgroup names and runc ids.
    public static func containerID(name: String) throws -> String {
        try SpecValidator.validateName(name)
        return "mvm-" + name
    }

    // MARK: run

    public var networkAttachment: NetworkAttachment {
        if case .docker = runtime { return .backendNetwork }
        return .perInstanceLink
    }

    public func defaultArtifacts() throws -> BootArtifacts? {
        guard let defaultRootfs else { return nil }
        return BootArtifacts(kernel: "", rootfsTree: try defaultRootfs())
    }

    /// Cancelling the task (a signal to `mvm run`) kills the container; the run then cleans up.
    public func execute(_ plan: LaunchPlan) async throws -> RunResult {
        let id = try Self.containerID(name: plan.name)
        if case .runsc = runtime, plan.spec.net != nil {
            throw MicroVMError.unsupported("runsc containers run without a network here (gVisor's netstack does not take mvm's veth namespace): drop --net, or use --runtime runc or docker")
        }
        let cancelled = CancelFlag()
        return try await withTaskCancellationHandler {
            try await offload { [self] in
                let rootfs = try checkRootfs(plan.rootfsTree)
                if case .docker = runtime {
                    return try DockerDriver(paths: paths, tarball: rootfsTarball).run(plan, rootfs: rootfs, cancelled: { cancelled.isSet })
                }
                return try runOCI(plan, rootfs: rootfs, cancelled: { cancelled.isSet })
            }
        } onCancel: { [self] in
            cancelled.set()
            if case .docker = runtime {
                _ = try? ProcessRunner.run(["docker", "kill", id], timeout: 30)
            } else if let rt = try? runtime.resolveOCI(profile: CachedProfile.get) {
                OCIRuntimeDriver(executable: rt.path, root: store.runtimeRoot).kill(id, signal: "KILL")
            }
        }
    }

    func checkRootfs(_ tree: String?) throws -> String {
        guard let rootfs = tree else {
            throw MicroVMError.invalidArgument("no rootfs for the container: pass a rootfs tree (VMSpec.rootfs) or build the default image with 'mvm image build'")
        }
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: rootfs, isDirectory: &isDir), isDir.boolValue else {
            throw MicroVMError.notFound("rootfs '\(rootfs)' is not a directory: pass the image's rootfs tree (mvm image build makes it)")
        }
        // The root is read-only, so the runtime cannot create missing mount points in it.
        let missing = ["proc", "sys", "dev", "tmp"].filter { !FileManager.default.fileExists(atPath: rootfs + "/" + $0) }
        guard missing.isEmpty else {
            throw MicroVMError(.invalidImage, "rootfs '\(rootfs)' lacks the mount point(s) \(missing.map { "/" + $0 }.joined(separator: ", ")): create them in the tree (mkdir) or rebuild the image")
        }
        return rootfs
    }

    func runOCI(_ plan: LaunchPlan, rootfs: String, cancelled: @escaping @Sendable () -> Bool = { false }) throws -> RunResult {
        let spec = plan.spec
        reapOrphans()
        let rt = try runtime.resolveOCI(profile: CachedProfile.get)
        let id = try Self.containerID(name: spec.name)
        let driver = OCIRuntimeDriver(executable: rt.path, root: store.runtimeRoot)
        // Wrapping in the image's shell lets the command's first action print the start marker.
        let hasShell = (try? FileManager.default.attributesOfItem(atPath: rootfs + "/bin/sh")) != nil
        let args = hasShell ? ["/bin/sh", "-c", "echo @@mvm:container-started@@; exec \"$@\"", "mvm"] + spec.command : spec.command
        var enforcement = plan.enforcement
        if driver.isRunsc {
            // gVisor's sentry and gofer run in the container's cgroup: its pids limit counts
            // their threads too, so the sandbox gets its own allowance on top of the workload's.
            enforcement.pidsLimit = enforcement.pidsLimit.map { $0 + Self.runscSandboxTasks }
        }

        var owner = OwnerRecord.current(name: spec.name, runtime: rt.path, cpus: enforcement.cpus, memory: enforcement.memory)
        if spec.net != nil {
            let n = ContainerNetwork.names(id: id)
            owner.netns = n.netns; owner.hostVeth = n.host
        }
        let bundle = try store.createBundle(id: id, owner: owner)
        var cleaned = false
        func cleanUp() {
            guard !cleaned else { return }
            cleaned = true
            Self.cleanUp(id: id, owner: owner, driver: driver, store: store)
        }
        defer { cleanUp() }

        var netnsPath: String? = nil
        if let net = spec.net {
            netnsPath = try ContainerNetwork.setUp(id: id, spec: net).netnsPath
        }
        var options = ContainerOptions(rootfs: rootfs, command: args, hostname: spec.name,
                                       cgroupsPath: "/\(CgroupDirs.parent)/\(store.cgroupLeaf(id))", enforcement: enforcement,
                                       env: spec.environment ?? ContainerOptions.defaultEnv, netnsPath: netnsPath,
                                       binds: try Self.diskBinds(spec.disks))
        options.cwd = spec.workingDirectory ?? "/"
        let config = try OCISpec.make(options)
        try Paths.writeScratch(config.encoded(), to: bundle + "/config.json")

        let launched = try StreamedRun.run(
            executable: rt.path,
            arguments: driver.globalArguments(network: spec.net != nil) + ["run", "--bundle", bundle, "--pid-file", bundle + "/container.pid", id],
            logPath: store.log(id), expectMarker: hasShell, timeout: spec.timeout, clock: plan.clock, cancelled: cancelled,
            onStart: { [pidFile = bundle + "/container.pid", holder = plan.holder, name = rt.name] in
                // The grant follows the container's init. runc writes its pid file after the
                // process has started, so the file may come a moment after the start marker.
                let deadline = Monotonic.seconds() + 5
                while Monotonic.seconds() < deadline {
                    if let text = try? String(contentsOfFile: pidFile, encoding: .utf8),
                       let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)) {
                        holder(pid, "\(name) container init")
                        return
                    }
                    usleep(5_000)
                }
            },
            onTimeout: { driver.kill(id, signal: "KILL") })
        let collector = launched.collector
        // The container's processes hold the pipes; once runc has reaped pid 1 they are all gone.
        if !collector.finish(timeout: 5) { CgroupDirs.remove(id: store.cgroupLeaf(id)); _ = collector.finish(timeout: 5) }
        cleanUp()
        let status = launched.status
        if let started = collector.startedAt {
            plan.clock.mark(.firstInstruction, at: started)
            plan.clock.mark(.ready, at: started)
        }
        let r = collector.result
        let console = (try? String(contentsOfFile: store.log(id), encoding: .utf8)) ?? (r.stdout + r.stderr)
        if launched.timedOut {
            throw MicroVMError(.timeout, "container '\(spec.name)' ran past its \(spec.timeout) s timeout and was killed; output so far: \(String((r.stdout + r.stderr).suffix(500)))")
        }
        if hasShell && !r.sawMarker && status != 0 {
            throw MicroVMError(.backend, "\(rt.name) could not start container '\(spec.name)' (status \(status)): \(r.stderr.trimmingCharacters(in: .whitespacesAndNewlines).suffix(2000))")
        }
        return plan.result(status: status, output: r.stdout + r.stderr, console: console)
    }

    /// Removes every trace of a container: runtime state, cgroups, network, bundle.
    static func cleanUp(id: String, owner: OwnerRecord?, driver: OCIRuntimeDriver, store: ContainerStore) {
        // `runc run` deletes its own state when it returns normally; only ask when some is left
        // (runc keeps a directory per container, runsc files that name it).
        if driver.hasState(id) {
            driver.kill(id, signal: "KILL")
            driver.delete(id)
        }
        CgroupDirs.remove(id: store.cgroupLeaf(id))
        if owner?.netns != nil { ContainerNetwork.tearDown(id: id) }
        store.reapFiles(id)
    }

    // MARK: reaper, list, stop, logs

    /// Deletes containers whose owning `mvm` process is gone (killed mid-run), with their
    /// cgroups, network and bundle. Runs at the start of every `run` and `list`.
    public func reapOrphans() {
        let store = self.store
        for id in store.bundleIDs() {
            let owner = store.readOwner(id)
            if let owner, owner.ownerAlive { continue }
            // A bundle with no owner record is a crash between mkdir and rename: nothing ran.
            let exe = owner?.runtime ?? (ProcessRunner.which("runc") ?? "runc")
            Self.cleanUp(id: id, owner: owner, driver: OCIRuntimeDriver(executable: exe, root: store.runtimeRoot), store: store)
        }
        // Runtime state with no bundle at all: its owner died while deleting.
        let runcIDs = ((try? FileManager.default.contentsOfDirectory(atPath: store.runtimeRoot)) ?? []).filter { $0.hasPrefix("mvm-") }
        for id in runcIDs where !FileManager.default.fileExists(atPath: store.bundle(id)) {
            if let exe = ProcessRunner.which("runc") {
                Self.cleanUp(id: id, owner: nil, driver: OCIRuntimeDriver(executable: exe, root: store.runtimeRoot), store: store)
            }
        }
        if case .docker = runtime { DockerDriver(paths: paths, tarball: rootfsTarball).reapOrphans() }
    }

    public func list() async throws -> [InstanceInfo] {
        try await offload { [self] in
            reapOrphans()
            // Docker's containers of ours too, whichever runtime this backend runs (`mvm ps`,
            // `mvm gc` and the commands that find an instance by name list through the runc
            // backend); those whose `mvm` was killed are removed on the way, or they would hold
            // their grant for ever. Here, not in the launch path: a runc start does not wait for
            // `docker ps`.
            var out: [InstanceInfo] = []
            for id in store.bundleIDs() {
                guard let owner = store.readOwner(id) else { continue }
                let st = OCIRuntimeDriver(executable: owner.runtime, root: store.runtimeRoot).state(id)
                out.append(InstanceInfo(name: owner.name, mode: .container, state: st?.status ?? "starting", pid: st?.pid,
                                        cpus: owner.cpus, memory: owner.memory, startedAt: owner.created, logPath: store.log(id)))
            }
            if ProcessRunner.which("docker") != nil { out += DockerDriver(paths: paths, tarball: rootfsTarball).list() }
            return out
        }
    }

    /// Where a running container of this name lives: an OCI bundle of ours (runc, crun, runsc)
    /// or Docker, whichever runtime this backend was made with.
    enum Located { case oci(OwnerRecord, OCIRuntimeDriver), docker(DockerDriver) }

    func locate(_ id: String, name: String) throws -> Located {
        if let owner = store.readOwner(id) { return .oci(owner, OCIRuntimeDriver(executable: owner.runtime, root: store.runtimeRoot)) }
        let docker = DockerDriver(paths: paths, tarball: rootfsTarball)
        if runtime == .docker || docker.knows(id) { return .docker(docker) }
        throw MicroVMError.notFound("no running container named '\(name)': see mvm ps")
    }

    /// SIGTERM, then SIGKILL after 5 s; the `run` that owns the container then cleans it up.
    public func stop(name: String) async throws {
        try await offload { [self] in
            let id = try Self.containerID(name: name)
            guard case .oci(let owner, let driver) = try locate(id, name: name) else {
                return try DockerDriver(paths: paths, tarball: rootfsTarball).stop(id: id)
            }
            driver.kill(id, signal: "TERM")
            let deadline = Date().addingTimeInterval(5)
            while Date() < deadline, let st = driver.state(id), st.status == "running" { usleep(50_000) }
            if driver.state(id)?.status == "running" { driver.kill(id, signal: "KILL") }
            if !owner.ownerAlive { Self.cleanUp(id: id, owner: owner, driver: driver, store: store) }
        }
    }

    /// `runc exec` (or the runtime's, or `docker exec`) in the running container.
    public func exec(name: String, command: [String]) async throws -> (status: Int32, output: String) {
        try await offload { [self] in
            let id = try Self.containerID(name: name)
            let argv: [String]
            switch try locate(id, name: name) {
            case .docker: argv = ["docker", "exec", id] + command
            case .oci(_, let driver): argv = driver.command(["exec", id] + command)
            }
            let r = try ProcessRunner.run(argv, timeout: 3600)
            return (r.status, r.stdoutText + r.stderrText)
        }
    }

    /// Every limit of a container changes live.
    public func checkUpdate(name: String, from: Enforcement, to: Enforcement) throws {}

    /// `runc update` (crun's, runsc's) with the new `linux.resources`, or `docker update`. The
    /// pids limit is left as it is (a resize does not change it, and runsc's counts its sandbox).
    public func update(name: String, from: Enforcement, to: Enforcement) async throws {
        try await offload { [self] in
            let id = try Self.containerID(name: name)
            switch try locate(id, name: name) {
            case .docker(let docker):
                try docker.update(id: id, to: to)
            case .oci(var owner, let driver):
                func update(_ e: Enforcement) throws -> ProcessRunner.Output {
                    var resources = OCIResources(enforcement: e)
                    resources.pids = nil
                    return try ProcessRunner.run(driver.command(["update", "--resources", "-", id]), input: try JSONEncoder().encode(resources), timeout: 60)
                }
                let out = try update(to)
                guard out.status == 0 else {
                    let why = OCIRuntimeDriver.failure(out.stderrText)
                    // A runtime may have written some limits before one failed: put them back.
                    _ = try? update(from)
                    throw MicroVMError(.backend, "\((driver.executable as NSString).lastPathComponent) update of container '\(name)' failed (status \(out.status)): \(why); nothing was changed")
                }
                owner.cpus = to.cpus
                owner.memory = to.memory
                try store.updateOwner(id, owner)
            }
        }
    }

    public func logs(name: String) async throws -> String {
        let id = try Self.containerID(name: name)
        guard let text = try? String(contentsOfFile: store.log(id), encoding: .utf8) else {
            throw MicroVMError.notFound("no log for container '\(name)' under \(store.logs): see mvm ps")
        }
        return text
    }
}

/// Set once a run is cancelled; read by the thread that starts the runtime.
final class CancelFlag: Sendable {
    private let flag = Atomic<Bool>(false)
    func set() { flag.store(true, ordering: .releasing) }
    var isSet: Bool { flag.load(ordering: .acquiring) }
}
