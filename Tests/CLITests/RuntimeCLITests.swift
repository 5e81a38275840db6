import Foundation
import Testing
import MicroVM

/// `mvm-runtime`, the runc-compatible command line whose containers are micro-VMs: bad bundles
/// are refused as runc refuses them, the lifecycle verbs drive a VM, and containerd's runc shim
/// (`ctr run --runc-binary`) and Docker (`--runtime mvm`) run a busybox image through it, leaving
/// nothing behind.
@Suite("mvm-runtime", .serialized, .timeLimit(.minutes(6)))
struct RuntimeCLITests {
    /// A directory of the test's own: state (`MVM_STATE_DIR`), the runtime's root, and
    /// `mvm-runtime`, a link to the built binary.
    final class Sandbox {
        let dir = "/tmp/mvm-rt-\(UUID().uuidString.prefix(8))"
        var env: [String: String] { ["MVM_STATE_DIR": dir + "/state"] }
        var root: String { dir + "/root" }
        var runtime: String { dir + "/mvm-runtime" }
        init() throws {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            try FileManager.default.createSymbolicLink(atPath: runtime, withDestinationPath: try #require(MVM.binary))
        }
        deinit { try? FileManager.default.removeItem(atPath: dir) }

        /// `mvm-runtime --root ROOT --log LOG --log-format json ARGS…`, its stdio in files (the
        /// supervisor `create` starts keeps them, as it keeps the shim's pipes).
        func run(_ args: [String], log: String? = nil, stdin: String = "/dev/null") throws -> ProcessRunner.Output {
            let logArgs = log.map { ["--log", $0, "--log-format", "json"] } ?? []
            let argv = [runtime, "--root", root] + logArgs + args
            let script = argv.map(ProcessRunner.shellQuote).joined(separator: " ") + " <\(ProcessRunner.shellQuote(stdin)) >\(dir)/out 2>\(dir)/err; s=$?; cat \(dir)/out; cat \(dir)/err >&2; exit $s"
            return try ProcessRunner.run(["sh", "-c", script], environment: env, timeout: 120)
        }

        /// A bundle whose rootfs is the busybox image's and whose config.json is `config`.
        func bundle(_ name: String, config: String, rootfs: Bool = true) throws -> String {
            let b = dir + "/" + name
            try FileManager.default.createDirectory(atPath: b, withIntermediateDirectories: true)
            if rootfs {
                let image = try ContainerImageStore(paths: Paths(state: dir + "/state", cache: dir + "/cache")).prepare(tarball: try ImageRunCLITests.image.get(), disk: false)
                try ProcessRunner.check(["cp", "-a", image.rootfsTree, b + "/rootfs"])
            }
            try config.write(toFile: b + "/config.json", atomically: true, encoding: .utf8)
            return b
        }

        func config(args: String = #"["sh", "-c", "echo hi; exit 3"]"#, resources: String = "{}") -> String {
            #"{"ociVersion": "1.0.2", "process": {"terminal": false, "user": {"uid": 0, "gid": 0}, "args": \#(args), "env": ["PATH=/bin"], "cwd": "/"}, "root": {"path": "rootfs"}, "linux": {"resources": \#(resources), "namespaces": [{"type": "pid"}]}, "mounts": []}"#
        }
    }

    /// Whether `body` is true within `seconds` (checked every 0.2 s).
    static func poll(_ seconds: Double, _ body: () -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        repeat { if body() { return true }; usleep(200_000) } while Date() < deadline
        return false
    }

    static let canRunVMs = KillSafetyCLITests.canRunHosted || HostProfile.current().kvm.verdict == .hardware

    /// Each bad bundle fails `create` with runc's kind of message on stderr and as a JSON error
    /// line in `--log`; no container directory, disk or pid file is left.
    @Test(.enabled(if: getuid() == 0 && ProcessRunner.which("busybox") != nil, "needs root and busybox-static"))
    func badBundlesAreRefusedAsRuncRefusesThem() throws {
        let s = try Sandbox()
        let cases: [(String, String, Bool, String)] = [
            ("noconfig", "", true, "no such file or directory"),
            ("norootfs", s.config(), false, "rootfs ("),
            ("badtype", s.config(args: #""sh -c true""#), true, "process.args must be an array (found a string instead)"),
            ("noargs", s.config(args: "[]"), true, "process.args must not be empty"),
            ("huge", s.config(resources: #"{"memory": {"limit": 1000000000000000}}"#), true, "more than this host's"),
            ("tiny", s.config(resources: #"{"memory": {"limit": 1000}}"#), true, "too small for a VM"),
            ("rlimit", s.config().replacingOccurrences(of: #""cwd": "/""#, with: #""cwd": "/", "rlimits": [{"type": "RLIMIT_BOGUS", "hard": 1, "soft": 1}]"#),
             true, "process.rlimits has an unknown type RLIMIT_BOGUS"),
            // A terminal comes through the guest agent, to the console socket: without either it cannot be.
            ("tty", s.config().replacingOccurrences(of: #""terminal": false"#, with: #""terminal": true"#), true,
             FileManager.default.fileExists(atPath: "/dev/vhost-vsock") ? "no --console-socket was given" : "a terminal needs the guest agent"),
        ]
        for (name, config, rootfs, complaint) in cases {
            let b = try s.bundle(name, config: config, rootfs: rootfs)
            if config.isEmpty { try FileManager.default.removeItem(atPath: b + "/config.json") }
            let log = s.dir + "/\(name).log.json"
            let r = try s.run(["create", "--bundle", b, "--pid-file", b + "/pid", name], log: log)
            #expect(r.status == 1 && r.stderrText.contains(complaint), "\(name): \(r.stderrText)")
            let line = try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n").last.map(String.init) ?? ""
            let json = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: String]
            #expect(json?["level"] == "error" && json?["msg"]?.contains(complaint) == true, "\(name): \(line)")
            #expect(!FileManager.default.fileExists(atPath: s.root + "/" + name) && !FileManager.default.fileExists(atPath: b + "/pid"))
        }
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: s.dir + "/state/runtime-disks")) ?? []).isEmpty)
        let verb = try s.run(["checkpoint", "x"])
        #expect(verb.status == 1 && verb.stderrText.contains("checkpoint is not supported"), "\(verb.stderrText)")
    }

    /// create, state, start, state, kill, delete by hand: the pid file names the supervisor, the
    /// process's output and status come back, KILL ends it with 137, and delete leaves nothing.
    @Test(.enabled(if: canRunVMs && ProcessRunner.which("busybox") != nil, "needs root, a VM backend (hosted QEMU or real KVM) and busybox-static"))
    func theLifecycleVerbsDriveAVM() throws {
        let s = try Sandbox()
        let b = try s.bundle("life", config: s.config(args: #"["sh", "-c", "echo hello from the guest; sleep 600"]"#))
        #expect(try s.run(["create", "--bundle", b, "--pid-file", b + "/pid", "life"]).status == 0)
        let pid = try #require(Int32(try String(contentsOfFile: b + "/pid", encoding: .utf8)))
        func state() throws -> [String: Any] {
            try #require(try JSONSerialization.jsonObject(with: Data(s.run(["state", "life"]).stdoutText.utf8)) as? [String: Any])
        }
        #expect(try state()["status"] as? String == "created" && state()["pid"] as? Int == Int(pid))
        #expect(try s.run(["start", "life"]).status == 0)
        #expect(try state()["status"] as? String == "running")
        #expect(try s.run(["ps", "--format", "json", "life"]).stdoutText.contains("\(pid)"))
        let busy = try s.run(["delete", "life"])
        #expect(busy.status == 1 && busy.stderrText.contains("not stopped"))
        // Wait for the VM to be up (its grant held) before stopping it.
        #expect(Self.poll(180) { (try? MVM.run(["ps"], environment: s.env).stdoutText.contains("running")) == true })
        // exec: a bad process file or a terminal is refused as runc refuses them; the process
        // runs through the guest agent where the host has vhost-vsock, and says why not elsewhere.
        try #"{"args": [], "cwd": "/"}"#.write(toFile: s.dir + "/noargs.json", atomically: true, encoding: .utf8)
        let noArgs = try s.run(["exec", "--process", s.dir + "/noargs.json", "--detach", "life"])
        #expect(noArgs.status == 1 && noArgs.stderrText.contains("args must not be empty"), "\(noArgs.stderrText)")
        let tty = try s.run(["exec", "-t", "--detach", "life", "true"])
        #expect(tty.status == 1 && tty.stderrText.contains("terminal"), "\(tty.stderrText)")
        #expect(try s.run(["exec", "nosuch", "true"]).status == 1)
        let exec = try s.run(["exec", "life", "sh", "-c", "echo exec-out; echo exec-err >&2; exit 4"])
        if FileManager.default.fileExists(atPath: "/dev/vhost-vsock") {
            #expect(exec.status == 4 && exec.stdoutText == "exec-out\n" && exec.stderrText == "exec-err\n", "\(exec.status) \(exec.stdoutText) \(exec.stderrText)")
        } else {
            #expect(exec.status == 1 && exec.stderrText.contains("no guest agent: exec needs /dev/vhost-vsock"), "\(exec.stderrText)")
        }
        // update, as the shim calls it (resources on stdin): the weight and the quota change
        // live through the allocator; what cannot be or does not fit is refused, nothing changed.
        try #"{"cpu": {"shares": 2048, "quota": 50000, "period": 100000}}"#.write(toFile: s.dir + "/res.json", atomically: true, encoding: .utf8)
        let updated = try s.run(["update", "--resources", "-", "life"], stdin: s.dir + "/res.json")
        #expect(updated.status == 0, "\(updated.stderrText)")
        let grant = { (try? MVM.run(["alloc", "show"], environment: s.env).stdoutText) ?? "" }
        #expect(grant().contains("weight 200, quota 0.5 CPUs"), "\(grant())")
        for (args, complaint) in [(["--memory", "1000T"], "more than this host's"), (["--cpuset-cpus", "0"], "cannot change for mvm-runtime"),
                                  (["--pids-limit", "7"], "pids.limit cannot change"), (["--cpu-share", "x"], "not an integer")] {
            let refused = try s.run(["update"] + args + ["life"])
            #expect(refused.status == 1 && refused.stderrText.contains(complaint), "\(args): \(refused.stderrText)")
        }
        #expect(grant().contains("weight 200, quota 0.5 CPUs"), "a refused update changes nothing: \(grant())")
        // Memory moves through the VM's balloon, within what it booted with.
        let shrunk = try s.run(["update", "--memory", "192M", "life"])
        #expect(shrunk.status == 0 && grant().contains("192M memory, weight 200"), "\(shrunk.stderrText) \(grant())")
        #expect(try s.run(["kill", "life", "KILL"]).status == 0)
        #expect(Self.poll(60) { (try? state()["status"] as? String) == "stopped" })
        let record = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: s.root + "/life/state.json"))) as? [String: Any]
        #expect(record?["exitStatus"] as? Int == 137)
        let deleted = try s.run(["delete", "life"])
        #expect(deleted.status == 0, "\(deleted.stderrText)")
        #expect(!FileManager.default.fileExists(atPath: s.root + "/life"))
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: s.dir + "/state/runtime-disks")) ?? []).isEmpty)
        #expect(try MVM.run(["alloc", "show"], environment: s.env).stdoutText.contains("grants      0"))
        #expect(try s.run(["delete", "--force", "life"]).status == 0, "deleting what is gone, forced, is no error")
    }

    /// containerd 1.6's runc shim drives mvm-runtime (a private containerd whose configuration is
    /// docs/runtime/containerd-config.toml): `ctr run` brings the guest's output and status back,
    /// `ctr task kill` stops a VM, and task and container deletes leave no VM, disk or grant.
    @Test(.enabled(if: canRunVMs && ProcessRunner.which("containerd") != nil && ProcessRunner.which("ctr") != nil && ProcessRunner.which("busybox") != nil,
                   "needs root, a VM backend, containerd and ctr, busybox-static"))
    func containerdRunsABusyboxImageInAMicroVM() throws {
        let s = try Sandbox()
        let snippet = try String(contentsOfFile: Paths.sourceDirectory() + "/docs/runtime/containerd-config.toml", encoding: .utf8)
            .split(separator: "\n").filter { !$0.hasPrefix("version") }.joined(separator: "\n")
        let config = "version = 2\nroot = \"\(s.dir)/ctrd-root\"\nstate = \"\(s.dir)/ctrd-state\"\n[grpc]\n  address = \"\(s.dir)/ctrd.sock\"\n" + snippet + "\n"
        try config.write(toFile: s.dir + "/containerd.toml", atomically: true, encoding: .utf8)
        let dump = try ProcessRunner.run(["containerd", "--config", s.dir + "/containerd.toml", "config", "dump"], timeout: 30)
        #expect(dump.stdoutText.contains("BinaryName = \"/usr/local/bin/mvm-runtime\""), "the documented runtime entry loads: \(dump.stderrText)")
        // The shim and mvm-runtime inherit containerd's environment: the test's state directory.
        let daemon = try ChildProcess(["containerd", "--config", s.dir + "/containerd.toml"], environment: s.env)
        defer { daemon.signal(SIGTERM); _ = daemon.wait(upTo: 10) }
        let ctr = ["ctr", "-a", s.dir + "/ctrd.sock"]
        #expect(Self.poll(30) { (try? ProcessRunner.run(ctr + ["version"], timeout: 10).status) == 0 })
        let imported = try ProcessRunner.run(ctr + ["image", "import", try ImageRunCLITests.image.get()], timeout: 60)
        #expect(imported.status == 0, "\(imported.stderrText)")
        let image = "docker.io/library/" + ImageRunCLITests.tag
        func shell(_ args: [String]) throws -> ProcessRunner.Output {
            try ProcessRunner.run(["sh", "-c", args.map(ProcessRunner.shellQuote).joined(separator: " ") + " </dev/null"], environment: s.env, timeout: 240)
        }
        let run = try shell(ctr + ["run", "--rm", "--runc-binary", s.runtime, image, "one", "sh", "-c", "echo hi from $(uname -r); exit 3"])
        #expect(run.status == 3 && run.stdoutText.hasPrefix("hi from "), "\(run.stdoutText)\(run.stderrText)")
        #expect(!run.stdoutText.contains(try String(contentsOfFile: "/proc/sys/kernel/osrelease", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines))
                || HostProfile.current().kvm.verdict == .hardware, "the guest's kernel answered, not the host's")

        #expect(try shell(ctr + ["run", "-d", "--runc-binary", s.runtime, image, "two", "sleep", "600"]).status == 0)
        #expect(Self.poll(180) { (try? MVM.run(["ps"], environment: s.env).stdoutText.contains("running")) == true })
        #expect(try shell(ctr + ["task", "kill", "two"]).status == 0)
        #expect(Self.poll(60) { (try? shell(ctr + ["task", "ls"]).stdoutText.contains("STOPPED")) == true })
        #expect(try shell(ctr + ["task", "delete", "two"]).status == 0)
        #expect(try shell(ctr + ["container", "delete", "two"]).status == 0)
        #expect(try MVM.run(["ps"], environment: s.env).stdoutText.split(separator: "\n").count == 1, "no instance left")
        #expect(try MVM.run(["alloc", "show"], environment: s.env).stdoutText.contains("grants      0"))
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: s.dir + "/state/runtime-disks")) ?? []).isEmpty)
    }

    /// `docker run --runtime mvm` where dockerd has the runtime (scripts/setup-runtime).
    @Test(.enabled(if: canRunVMs && KillAtPhaseCLITests.usable(.docker)
                   && (try? ProcessRunner.run(["docker", "info", "--format", "{{json .Runtimes}}"], timeout: 20).stdoutText.contains("\"mvm\"")) == true,
                   "needs a VM backend and a Docker engine with the runtime mvm (scripts/setup-runtime)"))
    func dockerRunsABusyboxImageInAMicroVM() throws {
        let loaded = try ProcessRunner.run(["docker", "load", "-i", try ImageRunCLITests.image.get()], timeout: 60)
        #expect(loaded.status == 0, "\(loaded.stderrText)")
        defer { _ = try? ProcessRunner.run(["docker", "rmi", ImageRunCLITests.tag], timeout: 60) }
        let r = try ProcessRunner.run(["docker", "run", "--rm", "--runtime", "mvm", ImageRunCLITests.tag, "echo hi; exit 6"], timeout: 240)
        #expect(r.status == 6 && r.stdoutText == "hi\n", "\(r.stdoutText)\(r.stderrText)")
    }
}
