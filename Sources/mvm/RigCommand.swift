import Foundation
import ArgumentParser
import MicroVM

struct RigCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rig",
        abstract: "The nested test rig: a QEMU TCG VM with an emulated AMD-V CPU where /dev/kvm is real.",
        subcommands: [RigRunCommand.self, RigStatusCommand.self])
}

struct RigRunCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Run a host command inside the rig (host root read-only, in the current directory), streaming its output and returning its status.")

    @Option(help: "vCPUs of the rig VM.") var cpus = 2
    @Option(help: "Memory of the rig VM in MiB.") var memory = 3072
    @Option(help: "Seconds before the rig is killed (boot included).") var timeout: Double = 600
    @Option(help: "Seconds the running rig may go without a heartbeat, console byte or output before it counts as stalled and is killed (0: never).")
    var stallTimeout: Double = 180
    @Option(help: "Seconds the command may go without output before the rig counts as stuck and is killed, even while its kernel still beats (0: never).")
    var outputTimeout: Double = 0
    @Option(name: .customLong("share"), help: "Host directory shared read-write at the same path (repeatable).") var shares: [String] = []
    @Argument(parsing: .captureForPassthrough, help: "The command and its arguments, after --.") var command: [String] = []

    func run() async throws {
        // Passthrough capture would hand a lone --help to the rig as the command.
        if command.first == "--help" || command.first == "-h" { throw CleanExit.helpRequest(self) }
        var argv = command
        if argv.first == "--" { argv.removeFirst() }
        guard !argv.isEmpty else { throw ValidationError("no command to run: mvm rig run [options] -- COMMAND [ARGS...]") }
        var options = RigOptions()
        options.cpus = cpus
        options.memoryMiB = memory
        options.timeout = timeout
        options.stallTimeout = stallTimeout
        options.outputTimeout = outputTimeout
        options.shares = shares.map { URL(fileURLWithPath: $0).standardizedFileURL.path }
        Rig.installSignalHandlers()
        let result = try RigRunner(options).run(command: argv, streamOutput: { chunk in
            FileHandle.standardOutput.write(chunk)
        })
        let summary = String(format: "mvm rig: boot %.1f s, total %.1f s, status %d\n", result.bootSeconds, result.wallSeconds, Int(result.status))
        FileHandle.standardError.write(Data(summary.utf8))
        if result.status != 0 { throw ExitCode(result.status) }
    }
}

struct RigStatusCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "status", abstract: "Say whether the rig can run here and why not.")
    func run() async throws {
        let c = Rig.status()
        print(c.usable ? "usable: \(c.detail)" : "not usable: \(c.detail)\(c.fix.map { "; fix: \($0)" } ?? "")")
        if !c.usable { throw ExitCode(1) }
    }
}
