import Foundation
import ArgumentParser
import Synchronization
import MicroVM

/// `mvm-runtime`: a runc-compatible command line whose containers are micro-VMs, for
/// containerd's `io.containerd.runc.v2` shim (`ctr run --runc-binary`, a runtime's `BinaryName`,
/// a Kubernetes RuntimeClass) and Docker's `runtimes`. It is this binary called by that name.
///
/// `create` checks the bundle, makes its root directory an ext4 disk and starts a supervisor (this
/// binary again, in a session of its own) whose pid goes in the pid file: it is the process the
/// shim watches, and its exit status is the container's. The supervisor waits on the container's
/// start FIFO until `start`, then runs the bundle's process in a VM (direct where KVM is real,
/// else hosted QEMU) under an allocator grant, writes what the process printed to the stdio the
/// shim gave `create`, and exits with the process's status. `kill` stops the VM (the signal's
/// number is in the exit status), `update` resizes it through the allocator, `exec` runs another
/// process in it through the guest agent, `delete` removes what `create` made.
enum RuntimeCLI {
    struct Global {
        var root = "/run/mvm-runtime"
        var log: String?
        var logJSON = false
    }

    /// What a run of `mvm-runtime` failed with: written to stderr and, as runc does, to `--log`.
    struct Failure: Error { var message: String }

    static let verbs = ["create", "start", "state", "kill", "delete", "ps", "exec", "update", "features"]

    static func main(_ arguments: [String]) async -> Int32 {
        var g = Global()
        do {
            let globals = try Options(arguments, values: ["root", "log", "log-format", "criu", "rootless"],
                                      flags: ["systemd-cgroup", "debug", "no-pivot", "v", "version"], untilPositional: true)
            g.root = globals.values["root"] ?? g.root
            g.log = globals.values["log"]
            g.logJSON = globals.values["log-format"] == "json"
            if !globals.flags.isDisjoint(with: ["v", "version"]) {
                print("mvm-runtime version 1 (MicroVM)\nspec: 1.0.2")
                return 0
            }
            guard let verb = globals.positional.first else {
                throw Failure(message: "no command given: mvm-runtime supports \(verbs.joined(separator: ", "))")
            }
            let rest = Array(globals.positional.dropFirst())
            switch verb {
            case "create": try create(g, rest)
            case "start": try start(g, rest)
            case "state": try state(g, rest)
            case "kill": try kill(g, rest)
            case "delete": try delete(g, rest)
            case "ps": try ps(g, rest)
            case "exec": return try exec(g, rest)
            case "update": try await update(g, rest)
            case "features": print(features)
            case "_supervise": return await supervise(g, rest)
            case "_exec": return relayExec(g, rest)
            default:
                throw Failure(message: "\(verb) is not supported by mvm-runtime (a container here is a micro-VM): it supports \(verbs.joined(separator: ", "))")
            }
            return 0
        } catch {
            let message = (error as? Failure)?.message ?? (error as? MicroVMError)?.description ?? String(describing: error)
            report(g, message)
            return 1
        }
    }

    static func split(_ a: String) -> (String, String?) {
        guard let eq = a.firstIndex(of: "=") else { return (a, nil) }
        return (String(a[..<eq]), String(a[a.index(after: eq)...]))
    }

    /// Where `report` writes for the user: stderr, or what stderr was before the supervisor
    /// sent its own diagnostics (libvirt's, the backends' warnings) to the log.
    nonisolated(unsafe) static var userError: Int32 = 2

    /// One error line on stderr and in the `--log` file (JSON lines as runc writes them, which
    /// containerd quotes when a call fails).
    static func report(_ g: Global, _ message: String) {
        write(userError, "mvm-runtime: \(message)\n")
        guard let log = g.log else { return }
        var line = "level=error msg=\"\(message)\"\n"
        if g.logJSON, let json = try? JSONSerialization.data(withJSONObject: ["level": "error", "msg": message, "time": ISO8601DateFormatter().string(from: Date())],
                                                               options: [.sortedKeys]) {
            line = String(decoding: json, as: UTF8.self) + "\n"
        }
        let fd = openLog(log)
        guard fd >= 0 else { return }
        write(fd, line)
        close(fd)
    }

    static func openLog(_ path: String) -> Int32 { open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o644) }

    static func write(_ fd: Int32, _ text: String) {
        _ = Array(text.utf8).withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
    }

    /// Options of a verb: `--name value`, `--name=value` and flags; the rest are positional.
    struct Options {
        var values: [String: String] = [:]
        var flags: Set<String> = []
        var positional: [String] = []
        /// `untilPositional`: the first word that is not a flag ends the options, and it and
        /// everything after it are positional (runc's global flags, then a command and its own).
        init(_ args: [String], values names: Set<String>, flags known: Set<String>, untilPositional: Bool = false) throws {
            var rest = args[...]
            while let a = rest.popFirst() {
                guard a.hasPrefix("-"), a.count > 1 else {
                    positional.append(a)
                    if untilPositional { positional += rest; break }
                    continue
                }
                let (flag, inline) = RuntimeCLI.split(a)
                let name = String(flag.drop { $0 == "-" })
                if names.contains(name) {
                    guard let v = inline ?? rest.popFirst() else { throw Failure(message: "flag \(flag) needs a value") }
                    values[name] = v
                } else if known.contains(name) {
                    flags.insert(name)
                } else {
                    throw Failure(message: "flag provided but not defined: \(flag)")
                }
            }
        }
        func id(_ verb: String) throws -> String {
            guard let id = positional.first, !id.isEmpty else { throw Failure(message: "\(verb) needs a container id") }
            return id
        }
    }

    // MARK: state

    /// What `create` records for a container, under `--root`/ID/state.json; runc's state fields
    /// first (what `state` prints), then ours.
    struct Record: Codable {
        var ociVersion = "1.0.2"
        var id: String
        var pid: Int32 = 0
        var status: String = "creating"
        var bundle: String
        var rootfs: String
        var created: String
        var owner = ""
        /// The instance's name (ledger owner, VM name).
        var instance: String
        /// The supervisor's start time (clock ticks after boot), so a reused pid is not taken for it.
        var pidStart: UInt64?
        /// The instance the supervisor launches, resolved from the bundle once, by `create`; its
        /// root disk is the container's own, under MicroVM's state (where QEMU, not root, can open it).
        var spec: VMSpec
        /// The signal `kill` was asked to deliver: the supervisor exits with 128 + it.
        var killSignal: Int32?
        var exitStatus: Int32?
        /// The process has a terminal (`process.terminal`): the console socket got its master.
        var terminal: Bool?
        /// The process's numeric user and resource limits, which the guest agent applies.
        var user: GuestAgent.Request.User?
        var limits: [GuestAgent.Request.Limit]?
    }

    struct Store {
        let root: String
        func dir(_ id: String) -> String { root + "/" + id }
        func load(_ id: String) throws -> Record {
            guard let data = FileManager.default.contents(atPath: dir(id) + "/state.json") else {
                throw Failure(message: "container \(id) does not exist")
            }
            do { return try JSONDecoder().decode(Record.self, from: data) } catch {
                throw Failure(message: "container \(id): its state file is unreadable: \(error)")
            }
        }
        func save(_ r: Record) throws {
            try Paths.writeScratch(try JSONEncoder().encode(r), to: dir(r.id) + "/state.json", atomically: true)
        }
        /// The supervisor runs: the recorded process, not a reuse of its pid, and not a zombie
        /// (an exited supervisor nobody reaped yet, its parent not a subreaper).
        func alive(_ r: Record) -> Bool { r.pid > 0 && ProcessIdentity.isAlive(pid: r.pid, startTime: r.pidStart) }
        func status(_ r: Record) -> String { alive(r) ? (r.status == "creating" ? "created" : r.status) : "stopped" }
    }

    static func validID(_ id: String) throws {
        guard !id.isEmpty, id.count <= 1024, !id.hasPrefix("."), !id.contains("/"), !id.contains("\u{0}") else {
            throw Failure(message: "invalid container id '\(id)'")
        }
    }

    /// A VM name (1-48 letters, digits, '-', '_', '.') for the container: its id where that fits, else a digest of it.
    static func instanceName(_ id: String) -> String {
        if (try? SpecValidator.validateName("ctr-" + id)) != nil { return "ctr-" + id }
        let safe = String(id.filter { $0.isASCII && ($0.isLetter || $0.isNumber) }.prefix(24))
        return "ctr-\(safe)-" + shortDigest(id)
    }

    /// The vsock context id of a container's VM: from its name, above the few ids people pick by
    /// hand (3...999) and below 2^31. Two containers whose ids meet here cannot both start: the
    /// second VM's vsock device is refused, and its `start` says so.
    static func agentCID(_ instance: String) -> UInt32 {
        1000 + UInt32(UInt64(shortDigest(instance), radix: 16)! % UInt64((1 << 31) - 1000))
    }

    // MARK: verbs

    static func create(_ g: Global, _ args: [String]) throws {
        let o = try Options(args, values: ["bundle", "b", "pid-file", "console-socket", "preserve-fds"], flags: ["no-pivot", "no-new-keyring", "detach", "d"])
        let id = try o.id("create")
        try validID(id)
        let bundleDir = o.values["bundle"] ?? o.values["b"] ?? FileManager.default.currentDirectoryPath
        let bundle = try RuntimeBundle(directory: bundleDir)
        let instance = instanceName(id)
        // The guest agent, for `exec`, where the host can reach a VM's vsock.
        let agent = FileManager.default.fileExists(atPath: "/dev/vhost-vsock") ? agentCID(instance) : nil
        if bundle.terminal {
            try checkTerminal(consoleSocket: o.values["console-socket"], agent: agent != nil, what: "process.terminal is set (ctr run -t, docker run -t)")
        }
        let spec = try bundle.spec(name: instance, config: try MicroVMConfig.load(), host: try HostCapacity.probe(),
                                   disk: Paths.default.state + "/runtime-disks/" + instance + ".ext4", agentCID: agent)
        let store = Store(root: g.root)
        let dir = store.dir(id)
        try Paths.ensureDirectory(g.root)
        guard mkdir(dir, 0o711) == 0 else {
            throw Failure(message: errno == EEXIST ? "container with id \(id) already exists" : "cannot create \(dir): \(String(cString: strerror(errno)))")
        }
        var r = Record(id: id, bundle: bundleDir, rootfs: bundle.rootfs, created: ISO8601DateFormatter().string(from: Date()), instance: instance, spec: spec)
        r.terminal = bundle.terminal ? true : nil
        (r.user, r.limits) = agentSettings(bundle.config.process)
        let disk = spec.rootfsDisk ?? ""
        do {
            try Paths.ensureDirectory((disk as NSString).deletingLastPathComponent)
            // The bundle's root as a disk of the container's own (read-only to the guest), with
            // the mount points the guest init needs made in the tree first, as runc makes them.
            try RootfsBuilder.addMountPoints(to: bundle.rootfs)
            try RootfsBuilder.makeExt4(fitting: bundle.rootfs, disk: disk)
            guard mkfifo(dir + "/start.fifo", 0o600) == 0 else { throw Failure(message: "cannot make \(dir)/start.fifo: \(String(cString: strerror(errno)))") }
            try store.save(r)
            let pid = try spawnSupervisor(g, id: id, console: bundle.terminal ? o.values["console-socket"] : nil)
            // The supervisor says it is ready by recording itself; a supervisor that died says why on stderr.
            let deadline = Monotonic.seconds() + 30
            while true {
                r = try store.load(id)
                if r.status == "created", r.pid == pid { break }
                var status: Int32 = 0
                if waitpid(pid, &status, WNOHANG) == pid { throw Failure(message: "the container's supervisor ended before it was ready (status \(status))") }
                guard Monotonic.seconds() < deadline else { Glibc.kill(pid, SIGKILL); throw Failure(message: "the container's supervisor was not ready within 30 s") }
                usleep(2_000)
            }
            if let pidFile = o.values["pid-file"] { try Paths.writeScratch(Data("\(pid)".utf8), to: pidFile, atomically: true) }
        } catch {
            try? FileManager.default.removeItem(atPath: disk)
            try? FileManager.default.removeItem(atPath: dir)
            throw error
        }
    }

    /// This binary as `mvm-runtime _supervise ID`, in a session of its own, with our stdio (the
    /// shim's pipes or FIFOs): once `create` exits, the shim (a subreaper) is its parent.
    static func spawnSupervisor(_ g: Global, id: String, console: String?) throws -> pid_t {
        var argv = ["mvm-runtime", "--root", g.root]
        if let log = g.log { argv += ["--log", log, "--log-format", g.logJSON ? "json" : "text"] }
        return try spawn(argv + ["_supervise", id], console: console)
    }

    /// Starts this binary as `argv` in a session of its own. With `console` (a console socket),
    /// its stdin, stdout and stderr are a new pseudo-terminal whose master goes to that socket,
    /// as runc gives a container's terminal to containerd's shim; else it has our stdio.
    static func spawn(_ argv: [String], console: String?) throws -> pid_t {
        guard let console else { return try ChildProcess.detached(argv, executable: "/proc/self/exe") }
        let slave = try Console.open(sendingMasterTo: console)
        defer { close(slave) }
        return try ChildProcess.detached(argv, executable: "/proc/self/exe", stdio: slave)
    }

    /// A terminal needs the guest agent (which gives the process one in the guest) and, as in
    /// runc, a console socket to send the host's end to.
    static func checkTerminal(consoleSocket: String?, agent: Bool, what: String) throws {
        guard agent else {
            throw Failure(message: "\(what): a terminal needs the guest agent, which needs /dev/vhost-vsock on the host (modprobe vhost_vsock); run without a terminal")
        }
        guard consoleSocket != nil else {
            throw Failure(message: "\(what) but no --console-socket was given: the terminal has nowhere to go")
        }
    }

    /// Releases the supervisor, which waits to open the start FIFO for writing, and returns once
    /// it has written the byte that says the container runs (as runc's exec.fifo).
    static func start(_ g: Global, _ args: [String]) throws {
        let id = try Options(args, values: [], flags: []).id("start")
        let store = Store(root: g.root)
        let r = try store.load(id)
        guard store.status(r) == "created" else { throw Failure(message: "cannot start a container that is \(store.status(r))") }
        let fd = open(store.dir(id) + "/start.fifo", O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else { throw Failure(message: "cannot open the container's start FIFO: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        var byte: UInt8 = 0
        guard poll(&p, 1, 10_000) == 1, read(fd, &byte, 1) == 1 else {
            throw Failure(message: "the container did not start within 10 s" + (store.alive(r) ? "" : ": its supervisor is gone"))
        }
    }

    static func state(_ g: Global, _ args: [String]) throws {
        let id = try Options(args, values: [], flags: []).id("state")
        let store = Store(root: g.root)
        var r = try store.load(id)
        r.status = store.status(r)
        let shown: [String: Any] = ["ociVersion": r.ociVersion, "id": r.id, "pid": r.status == "stopped" ? 0 : Int(r.pid), "status": r.status,
                                    "bundle": r.bundle, "rootfs": r.rootfs, "created": r.created, "owner": r.owner,
                                    "annotations": ["io.microvm.instance": r.instance]]
        let data = try JSONSerialization.data(withJSONObject: shown, options: [.prettyPrinted, .sortedKeys])
        print(String(decoding: data, as: UTF8.self))
    }

    /// Signal names and numbers as runc takes them (KILL, SIGKILL, 9).
    static func signalNumber(_ text: String) throws -> Int32 {
        let names: [String: Int32] = ["HUP": SIGHUP, "INT": SIGINT, "QUIT": SIGQUIT, "KILL": SIGKILL, "TERM": SIGTERM, "USR1": SIGUSR1, "USR2": SIGUSR2,
                                      "STOP": SIGSTOP, "CONT": SIGCONT, "PWR": 30, "WINCH": SIGWINCH]
        if let n = Int32(text), n > 0, n < 65 { return n }
        let name = text.uppercased().hasPrefix("SIG") ? String(text.uppercased().dropFirst(3)) : text.uppercased()
        guard let n = names[name] else { throw Failure(message: "unknown signal \"\(text)\"") }
        return n
    }

    /// Where the guest agent runs the container's process, a signal reaches that process in the
    /// guest (through the supervisor, which sends it on), and KILL stops the VM. Without the
    /// agent, signals that end a process end the VM: the supervisor stops it and exits with 128
    /// + the signal. A guest cannot be stopped or continued from here.
    static func kill(_ g: Global, _ args: [String]) throws {
        let o = try Options(args, values: [], flags: ["all", "a"])
        let id = try o.id("kill")
        let sig = try signalNumber(o.positional.dropFirst().first ?? "TERM")
        let store = Store(root: g.root)
        var r = try store.load(id)
        guard store.alive(r) else { throw Failure(message: "container not running") }
        if r.spec.agentRunsCommand == true, r.status == "running", sig != SIGKILL {
            guard GuestAgent.relayedSignals.contains(sig) else {
                throw Failure(message: "signal \(sig) cannot be sent on to the process inside the VM; HUP, INT, QUIT, USR1, USR2, TERM, WINCH and PWR reach it, KILL stops the VM")
            }
            Glibc.kill(r.pid, sig)
            return
        }
        guard [SIGKILL, SIGTERM, SIGINT, SIGHUP, SIGQUIT, 30].contains(sig) else {
            throw Failure(message: "signal \(sig) cannot reach the process inside the VM; KILL, TERM, INT, HUP, QUIT and PWR stop it")
        }
        r.killSignal = sig
        try store.save(r)
        // Before start nothing runs but the supervisor: it ends as is.
        Glibc.kill(r.pid, r.status == "created" ? SIGKILL : SIGTERM)
    }

    static func delete(_ g: Global, _ args: [String]) throws {
        let o = try Options(args, values: [], flags: ["force", "f"])
        let id = try o.id("delete")
        let force = o.flags.contains("force") || o.flags.contains("f")
        let store = Store(root: g.root)
        guard let r = try? store.load(id) else {
            if force { return }
            throw Failure(message: "container \(id) does not exist")
        }
        // A supervisor that recorded its container's end may still be exiting: that is stopped, as `state` says.
        if store.alive(r), r.status != "stopped" {
            guard force else { throw Failure(message: "cannot delete container \(id) that is not stopped: \(store.status(r))") }
            try kill(g, [id, "KILL"])
            let deadline = Monotonic.seconds() + 60
            while store.alive(r), Monotonic.seconds() < deadline { usleep(20_000) }
            if store.alive(r) { Glibc.kill(r.pid, SIGKILL); usleep(100_000) }
        }
        if let disk = r.spec.rootfsDisk { try? FileManager.default.removeItem(atPath: disk) }
        try? FileManager.default.removeItem(atPath: store.dir(id))
    }

    static func ps(_ g: Global, _ args: [String]) throws {
        let o = try Options(args, values: ["format", "f"], flags: [])
        let id = try o.id("ps")
        let store = Store(root: g.root)
        let r = try store.load(id)
        let pids = store.alive(r) ? [Int(r.pid)] : []
        if (o.values["format"] ?? o.values["f"]) == "json" {
            print("[" + pids.map(String.init).joined(separator: ",") + "]")
        } else {
            print("PID\n" + pids.map(String.init).joined(separator: "\n"))
        }
    }

    /// `update --resources FILE|-` (as containerd's shim calls it for `ctr task update` and
    /// `docker update`) or runc's own flags: the VM's grant and limits change live through the
    /// allocator, as `mvm update` changes them, or nothing changes and the error says why. The
    /// weight and the quota change in every mode; vCPUs and memory where the VM can change them
    /// (see `mvm update`).
    static func update(_ g: Global, _ args: [String]) async throws {
        let fixed = ["cpuset-cpus": "the allocator places a micro-VM's vCPUs", "cpuset-mems": "the allocator places a micro-VM's memory",
                     "memory-swap": "a micro-VM's memory is never swapped by its limit", "memory-reservation": "a micro-VM is granted its whole memory",
                     "kernel-memory": "the guest's kernel memory is inside its memory", "kernel-memory-tcp": "the guest's kernel memory is inside its memory",
                     "blkio-weight": "a micro-VM's disk has no weight", "cpu-rt-period": "a micro-VM has no real-time CPU time",
                     "cpu-rt-runtime": "a micro-VM has no real-time CPU time", "l3-cache-schema": "a micro-VM has no cache allocation",
                     "mem-bw-schema": "a micro-VM has no memory bandwidth allocation"]
        let o = try Options(args, values: Set(["resources", "r", "memory", "cpu-quota", "cpu-period", "cpu-share", "pids-limit"] + fixed.keys), flags: [])
        let id = try o.id("update")
        if let (flag, why) = fixed.first(where: { o.values[$0.key] != nil }) {
            throw Failure(message: "--\(flag) cannot change for mvm-runtime: \(why)")
        }
        let store = Store(root: g.root)
        let r = try store.load(id)
        guard store.alive(r), r.status == "running" else {
            throw Failure(message: "container \(id) is \(store.status(r)): only a running micro-VM can be updated")
        }
        let resources: RuntimeBundle.Config.Resources
        if let source = o.values["resources"] ?? o.values["r"] {
            let data = source == "-" ? FileHandle.standardInput.readDataToEndOfFile() : FileManager.default.contents(atPath: source)
            guard let data else { throw Failure(message: "open \(source): cannot read the resources file") }
            resources = try RuntimeBundle.resources(from: data, named: source == "-" ? "the resources on stdin" : source)
        } else {
            var memory: [String: Any] = [:], cpu: [String: Any] = [:], pids: [String: Any] = [:]
            if let m = o.values["memory"] { memory["limit"] = try ByteCount(parsing: m).bytes }
            for (flag, key) in [("cpu-quota", "quota"), ("cpu-period", "period"), ("cpu-share", "shares")] {
                guard let v = o.values[flag] else { continue }
                guard let n = Int64(v) else { throw Failure(message: "invalid value \"\(v)\" for flag --\(flag): not an integer") }
                cpu[key] = n
            }
            if let v = o.values["pids-limit"] {
                guard let n = Int64(v) else { throw Failure(message: "invalid value \"\(v)\" for flag --pids-limit: not an integer") }
                pids["limit"] = n
            }
            let all: [String: Any] = ["memory": memory, "cpu": cpu, "pids": pids].filter { !($0.value as? [String: Any] ?? [:]).isEmpty }
            resources = try RuntimeBundle.resources(from: try JSONSerialization.data(withJSONObject: all), named: "the flags")
        }
        if let set = resources.cpu?.cpus, !set.isEmpty { throw Failure(message: "cpu.cpus cannot change for mvm-runtime: \(fixed["cpuset-cpus"]!)") }
        let host = try HostCapacity.probe()
        let (change, pids) = try RuntimeBundle.change(resources, hostMemory: host.memoryTotal, hostCPUs: host.onlineCPUs.count)
        if let pids, pids != r.spec.slice?.pidsLimit {
            throw Failure(message: "pids.limit cannot change on a running micro-VM: the guest's processes are not the host's (it was \(r.spec.slice?.pidsLimit.map(String.init) ?? "unset"))")
        }
        guard !change.isEmpty else { return }
        let cfg = try MicroVMConfig.load()
        let backend = try await InstanceLookup.find(name: r.instance, connect: cfg.defaults.connect)
        _ = try await InstanceUpdater(allocator: try Allocator.open(paths: .default, config: cfg)).update(name: r.instance, change, on: backend)
    }

    /// `exec [--process FILE | ID CMD ARG...] [--detach] [--pid-file P] [--cwd D] [--env E]...
    /// [--user UID[:GID]] ID`: runs a process in the running container's VM through the guest
    /// agent, as containerd's shim calls it for `ctr task exec` and Docker for `docker exec`.
    /// Without `--detach` it relays stdio and signals and exits with the process's status; with
    /// it, a relay of its own (in the pid file, which the shim watches) does that, and `exec`
    /// returns once it runs.
    static func exec(_ g: Global, _ args: [String]) throws -> Int32 {
        let o = try Options(args, values: ["process", "p", "pid-file", "console-socket", "cwd", "env", "e", "user", "u", "preserve-fds",
                                           "process-label", "apparmor", "cap", "c", "cgroup"],
                            flags: ["detach", "d", "tty", "t", "no-new-privs", "ignore-paused"], untilPositional: true)
        let id = try o.id("exec")
        let store = Store(root: g.root)
        let r = try store.load(id)
        guard store.alive(r), r.status == "running" else { throw Failure(message: "cannot exec in a container that is \(store.status(r))") }
        var request: GuestAgent.Request
        if let file = o.values["process"] ?? o.values["p"] {
            guard let data = FileManager.default.contents(atPath: file) else { throw Failure(message: "open \(file): cannot read the process file") }
            let p = try RuntimeBundle.process(from: data, named: file)
            request = GuestAgent.Request(arguments: p.args ?? [], environment: p.env, workingDirectory: p.cwd.flatMap { $0.isEmpty ? nil : $0 },
                                         terminal: p.terminal == true ? true : nil)
            (request.user, request.limits) = agentSettings(p)
        } else {
            guard o.positional.count > 1 else { throw Failure(message: "exec needs a command: mvm-runtime exec ID CMD [ARG...], or --process FILE") }
            request = GuestAgent.Request(arguments: Array(o.positional.dropFirst()), workingDirectory: o.values["cwd"],
                                         terminal: o.flags.isDisjoint(with: ["tty", "t"]) ? nil : true)
            // As runc: the container's environment, then what --env adds (the agent supplies a PATH if none).
            if let e = o.values["env"] ?? o.values["e"] { request.environment = (r.spec.environment ?? []) + [e] } else { request.environment = r.spec.environment }
            if let u = o.values["user"] ?? o.values["u"] {
                let parts = u.split(separator: ":", omittingEmptySubsequences: false).map { UInt32($0) }
                guard let uid = parts.first ?? nil, parts.count <= 2, parts.allSatisfy({ $0 != nil }) else {
                    throw Failure(message: "--user \(u): give UID or UID:GID (numbers: the guest's names are not the host's)")
                }
                request.user = .init(uid: uid, gid: parts.count == 2 ? parts[1]! : uid)
            }
        }
        let detach = !o.flags.isDisjoint(with: ["detach", "d"])
        if request.terminal == true {
            // In the foreground, this command's own terminal serves when no console socket is given.
            try checkTerminal(consoleSocket: o.values["console-socket"] ?? (detach || isatty(0) == 0 ? nil : "-"), agent: r.spec.vsockCID != nil,
                              what: "the process asks for a terminal (ctr task exec -t, docker exec -t)")
        }
        guard r.spec.vsockCID != nil else {
            throw Failure(message: "container \(id) has no guest agent: exec needs /dev/vhost-vsock when the container is created (modprobe vhost_vsock)")
        }
        let encoded = try JSONEncoder().encode(request).base64EncodedString()
        let console = request.terminal == true ? o.values["console-socket"] : nil
        guard detach else {
            // In the foreground this process is the relay, on the console socket's terminal when there is one.
            let terminal = try console.map { try Console.open(sendingMasterTo: $0) }
            defer { if let terminal { close(terminal) } }
            return relayExec(g, [id, encoded], terminal: terminal)
        }
        var argv = ["mvm-runtime", "--root", g.root]
        if let log = g.log { argv += ["--log", log, "--log-format", g.logJSON ? "json" : "text"] }
        let pid = try spawn(argv + ["_exec", id, encoded], console: console)
        if let pidFile = o.values["pid-file"] { try Paths.writeScratch(Data("\(pid)".utf8), to: pidFile, atomically: true) }
        return 0
    }

    /// The user and resource limits of an OCI process as the guest agent takes them (root: no user).
    static func agentSettings(_ p: RuntimeBundle.Config.Process?) -> (GuestAgent.Request.User?, [GuestAgent.Request.Limit]?) {
        let user = p?.user.flatMap { u in (u.uid ?? 0) == 0 && (u.gid ?? 0) == 0 ? nil : GuestAgent.Request.User(uid: u.uid ?? 0, gid: u.gid ?? 0) }
        let limits = (p?.rlimits ?? []).compactMap { l in RuntimeBundle.rlimitTypes[l.type].map { GuestAgent.Request.Limit(resource: $0, soft: l.soft, hard: l.hard) } }
        return (user, limits.isEmpty ? nil : limits)
    }

    /// `_exec ID REQUEST`: runs the request (base64 of its JSON) in the container's VM, with this
    /// process's stdin, stdout and stderr as the process's (or `terminal` as its terminal), and
    /// the signals it gets sent on to the process; exits with the process's status (137 when the
    /// VM goes away before it ends).
    static func relayExec(_ g: Global, _ args: [String], terminal: Int32? = nil) -> Int32 {
        let store = Store(root: g.root)
        guard args.count == 2, let r = try? store.load(args[0]), let cid = r.spec.vsockCID,
              let data = Data(base64Encoded: args[1]), var request = try? JSONDecoder().decode(GuestAgent.Request.self, from: data) else {
            report(g, "exec: no such container, or a bad request")
            return 126
        }
        let signals = GuestAgent.signalDescriptor(GuestAgent.relayedSignals)
        signal(SIGPIPE, SIG_IGN)
        let input = terminal ?? 0
        var saved: termios?
        if request.terminal == true {
            // The terminal (a console socket's, or the caller's on stdin): raw here, the guest's
            // does the rest. It is not made our controlling terminal: its hangup must not reach
            // the processes we start.
            saved = Console.makeRaw(input)
            request.size = Console.size(of: input)
        }
        defer { Console.restore(input, saved) }
        do {
            // Right after `start` the guest may still be booting: its agent is reached once it
            // listens, as long as the container runs (at most 120 s).
            let deadline = Monotonic.seconds() + 120
            let fd = try GuestAgent.connect(cid: cid, port: GuestProtocol.vsockShellPort, interval: 0.2) {
                store.alive(r) && Monotonic.seconds() < deadline
            }
            defer { close(fd) }
            return try GuestAgent.relay(fd, request, input: input, signals: signals, timeout: nil, output: GuestAgent.toStdio(terminal: terminal))
        } catch let e as MicroVMError where e.code == .guestError && !store.alive(r) {
            report(g, "exec: the container's VM stopped before the process ended")
            return 137
        } catch {
            report(g, "exec: \((error as? MicroVMError)?.description ?? String(describing: error))")
            return 126
        }
    }

    /// Whether a launch has ended, for code that cannot await it.
    final class Ended: Sendable {
        let flag = Mutex(false)
        var value: Bool { flag.withLock { $0 } }
    }

    /// Boots the container's VM and, once its guest agent listens, runs the process through it:
    /// stdout and stderr (or its `terminal`, on our stdin) stream to this process's as they come,
    /// stdin follows, and the signals `kill` sends on reach the process; KILL (recorded by `kill`) stops the VM instead. The
    /// process's end ends the VM (the guest init waits for it, `mvm.await`). Returns its status,
    /// 137 when KILL stopped it, or the VM's own result when it ended before the agent answered.
    static func superviseThroughAgent(store: Store, id: String, request: GuestAgent.Request, cid: UInt32, signals: Int32?,
                                      launch: @escaping @Sendable () async throws -> RunResult) async throws -> Int32 {
        let ended = Ended()
        let vm = Task {
            defer { ended.flag.withLock { $0 = true } }
            return try await launch()
        }
        let killed = { @Sendable in (try? store.load(id).killSignal) == SIGKILL }
        var sized = request
        if sized.terminal == true { sized.size = Console.size(of: 0) }
        let request = sized
        let relayed = await Task.detached { () throws -> Int32 in
            // The agent listens once the guest has booted; a VM that ends first, or KILL, stops the wait.
            let fd = try GuestAgent.connect(cid: cid, port: GuestProtocol.vsockShellPort, interval: 0.1) {
                if killed() { throw CancellationError() }
                return !ended.value
            }
            defer { close(fd) }
            return try GuestAgent.relay(fd, request, input: 0, signals: signals, timeout: nil, forward: { _ in
                guard killed() else { return true }
                vm.cancel()
                return false
            }, output: GuestAgent.toStdio())
        }.result
        if case .failure = relayed { vm.cancel() }
        // The process has ended: the guest powers off by itself; one that does not is stopped.
        let stopper = Task {
            try await Task.sleep(for: .seconds(30))
            vm.cancel()
        }
        let launched = await vm.result
        stopper.cancel()
        if killed() { return 128 + SIGKILL }
        if case .success(let status) = relayed { return status }
        let result = try launched.get()
        FileHandle.standardOutput.write(Data(result.output.utf8))
        return result.exitStatus
    }

    static let features = """
        {"ociVersionMin": "1.0.0", "ociVersionMax": "1.0.2", "hooks": [], "mountOptions": [],
         "linux": {"namespaces": [], "capabilities": [], "cgroup": {"v1": true, "v2": true, "systemd": false}},
         "annotations": {"io.microvm.isolation": "vm"}}
        """

    // MARK: supervisor

    /// Waits for `start`, runs the bundle's process in a VM, prints its output, exits with its status.
    static func supervise(_ g: Global, _ args: [String]) async -> Int32 {
        let store = Store(root: g.root)
        guard let id = args.first, var r = try? store.load(id) else { report(g, "supervisor: no such container"); return 125 }
        // The container's stderr carries its process's output and our errors, not the
        // diagnostics of libvirt and the backends: those go to the log.
        userError = dup(2)
        // Caught from here on, so no signal `kill` sends on ends this process before the VM is stopped.
        let agentSignals = r.spec.agentRunsCommand == true ? GuestAgent.signalDescriptor(GuestAgent.relayedSignals) : nil
        let diagnostics = openLog(g.log ?? "/dev/null")
        if diagnostics >= 0 { dup2(diagnostics, 2); close(diagnostics) }
        r.pid = getpid()
        r.pidStart = ProcessIdentity.startTime(pid: getpid())
        r.status = "created"
        do { try store.save(r) } catch { report(g, "supervisor: \(error)"); return 125 }
        // Blocks until `start` opens the FIFO for reading; the byte tells it the container runs.
        let fd = open(store.dir(id) + "/start.fifo", O_WRONLY | O_CLOEXEC)
        r = (try? store.load(id)) ?? r
        r.status = "running"
        try? store.save(r)
        if fd >= 0 { write(fd, "1"); close(fd) }
        let status: Int32
        do {
            let cfg = try MicroVMConfig.load()
            let backend = try Backends.make(mode: BackendCatalog.runtimeVMMode(kvm: HostProfile.current().kvm.verdict), connect: cfg.defaults.connect, runtime: nil)
            let launcher = InstanceLauncher(grants: AllocatorGrants(config: cfg))
            let spec = r.spec
            if spec.agentRunsCommand == true, let cid = spec.vsockCID {
                var request = GuestAgent.Request(arguments: spec.command.isEmpty ? ["true"] : spec.command, environment: spec.environment,
                                                 workingDirectory: spec.workingDirectory, user: r.user, main: true, terminal: r.terminal)
                request.limits = r.limits
                status = try await superviseThroughAgent(store: store, id: id, request: request, cid: cid, signals: agentSignals) {
                    try await launcher.launch(spec, on: backend)
                }
            } else {
                let result = try await SignalStop.cancellingOnSignals {
                    try await launcher.launch(spec, on: backend)
                }
                FileHandle.standardOutput.write(Data(result.output.utf8))
                status = result.exitStatus
            }
        } catch let e as ExitCode {
            // Stopped by a signal: `kill` recorded which one the shim asked for.
            status = (try? store.load(id).killSignal).flatMap { $0 }.map { 128 + $0 } ?? e.rawValue
        } catch {
            report(g, (error as? MicroVMError)?.description ?? String(describing: error))
            status = 125
        }
        r = (try? store.load(id)) ?? r
        r.status = "stopped"
        r.exitStatus = status
        try? store.save(r)
        return status
    }
}
