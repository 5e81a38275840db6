import ArgumentParser
import Foundation
import MicroVM

/// The instance a command acts on, whatever its mode.
struct InstanceArguments: ParsableArguments {
    @Argument(help: "Instance name (see mvm ps).") var name: String
    @Option(help: "libvirt URI for hosted instances.") var connect: String?

    func backend() async throws -> any InstanceBackend { try await InstanceLookup.find(name: name, connect: connect) }
}

struct StopCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stop", abstract: "Stop an instance by name (graceful, then forced), whatever its mode.")
    @OptionGroup var instance: InstanceArguments

    func run() async throws {
        try await instance.act("stopped") { try await $0.stop(name: $1) }
        // A run that was killed cannot release its grant itself: with its instance stopped, the
        // grant goes now rather than at the next `mvm gc`.
        _ = try? Allocator.open(paths: .default, config: try MicroVMConfig.load()).reclaimDead()
    }
}

struct LogsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "logs", abstract: "Print the console (VMs) or output (containers) of an instance; a direct VM's also after it ended (the newest 32 ended runs).")
    @OptionGroup var instance: InstanceArguments
    @Flag(name: .shortAndLong, help: "Follow: keep printing what arrives until the instance ends.") var follow = false

    func run() async throws {
        try await reportingErrors {
            let backend = try await instance.backend()
            let path = try await backend.list().first { $0.name == instance.name }?.logPath
            guard follow, let path, let log = FileHandle(forReadingAtPath: path) else {
                FileHandle.standardOutput.write(Data(try await backend.logs(name: instance.name).utf8))
                return
            }
            // Follow the log file itself: each round reads only what was appended since the last.
            // A console log that starts over shrinks in place (its content moved to .1): read it
            // again from its start.
            while true {
                let running = (try? await backend.list())?.contains { $0.name == instance.name } ?? false
                var st = stat()
                if fstat(log.fileDescriptor, &st) == 0, let at = try? log.offset(), UInt64(st.st_size) < at { try log.seek(toOffset: 0) }
                if let more = try log.readToEnd(), !more.isEmpty { FileHandle.standardOutput.write(more) }
                if !running { return }
                try await Task.sleep(for: .milliseconds(250))
            }
        }
    }
}

enum InstanceLookup {
    /// The backend that knows an instance of this name; one clear error when none does.
    static func find(name: String, connect: String?) async throws -> any InstanceBackend {
        for b in Backends.all(connect: connect) {
            if let list = try? await b.list(), list.contains(where: { $0.name == name }) { return b }
        }
        throw MicroVMError.notFound("no instance named '\(name)': see `mvm ps` for the instances of every mode")
    }
}

struct PauseCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "pause", abstract: "Pause an instance (direct: its vCPUs leave the guest; hosted: QEMU stops).")
    @OptionGroup var instance: InstanceArguments

    func run() async throws { try await instance.act("paused") { try await $0.pause(name: $1) } }
}

struct ResumeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "resume", abstract: "Resume a paused instance.")
    @OptionGroup var instance: InstanceArguments

    func run() async throws { try await instance.act("resumed") { try await $0.resume(name: $1) } }
}

extension InstanceArguments {
    /// Finds the instance's backend, does `action` to it and says so.
    func act(_ done: String, _ action: (any InstanceBackend, String) async throws -> Void) async throws {
        try await reportingErrors {
            try await action(try await backend(), name)
            print("\(done) \(name)")
        }
    }
}

struct StatsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stats", abstract: "Print an instance's counters in Prometheus' text format (direct: the VMM's exits, devices, balloon and state; hosted: libvirt's view of the domain and its balloon).")
    @OptionGroup var instance: InstanceArguments

    func run() async throws {
        try await reportingErrors {
            print(try await instance.backend().stats(name: instance.name), terminator: "")
        }
    }
}

struct ExecCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "exec",
        abstract: "Run a command in a running instance and exit with its status (containers; direct and hosted VMs started with --vsock CID --vsock-shell).",
        discussion: """
            In a VM the command runs through the guest agent: its stdout and stderr stream back as they come, \
            and the signals this command gets (Ctrl-C too) go on to it. Example: mvm exec web-1 -- cat /proc/loadavg
            """)
    @OptionGroup var instance: InstanceArguments
    @Flag(name: .shortAndLong, help: "Keep stdin open: what this command reads goes to the process (VMs; without it the process's stdin is empty).") var interactive = false
    @Flag(name: .shortAndLong, help: "Give the process a terminal in the guest, on this command's own (VMs; stdin must be a terminal): mvm exec -it NAME -- sh") var tty = false
    @Argument(parsing: .postTerminator, help: "The command to run inside.") var command: [String] = []

    func run() async throws {
        let status: Int32 = try await reportingErrors {
            guard !command.isEmpty else { throw MicroVMError.invalidArgument("give the command after --: mvm exec \(instance.name) -- CMD") }
            let backend = try await instance.backend()
            guard let cid = try await backend.agentCID(name: instance.name) else {
                if interactive || tty { throw MicroVMError.unsupported("--interactive and --tty work for VMs: a container's exec here has no stdin") }
                let r = try await backend.exec(name: instance.name, command: command)
                FileHandle.standardOutput.write(Data(r.output.utf8))
                return r.status
            }
            if tty, isatty(0) == 0 { throw MicroVMError.invalidArgument("--tty needs a terminal on stdin: run it from one, or leave -t out") }
            let signals = GuestAgent.signalDescriptor(GuestAgent.relayedSignals)
            let fd = try GuestAgent.connect(cid: cid, port: GuestProtocol.vsockShellPort)
            defer { close(fd) }
            // With a terminal, this one is raw while the command runs: the guest's does the echo and the line editing.
            let saved = tty ? Console.makeRaw(0) : nil
            defer { Console.restore(0, saved) }
            let request = GuestAgent.Request(arguments: command, terminal: tty ? true : nil, size: tty ? Console.size(of: 0) : nil)
            // The first INT, TERM or HUP goes to the process; a second one stops waiting for a
            // guest that does not end it.
            var asked: Int32?
            return try GuestAgent.relay(fd, request, input: interactive || tty ? 0 : nil, signals: signals, timeout: nil, forward: { sig in
                guard [SIGINT, SIGTERM, SIGHUP].contains(sig) else { return true }
                if let asked {
                    throw MicroVMError(.guestError, "stopped waiting: the process in '\(instance.name)' did not end on signal \(asked)")
                }
                asked = sig
                return true
            }, output: GuestAgent.toStdio())
        }
        if status != 0 { throw ExitCode(status) }
    }
}
