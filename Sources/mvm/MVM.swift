import ArgumentParser
import MicroVM

/// `mvm`, or `mvm-runtime` when called by that name (a link to this binary): the OCI runtime
/// command line containerd and Docker drive.
@main
enum Entry {
    static func main() async {
        if (CommandLine.arguments.first.map { ($0 as NSString).lastPathComponent }) == "mvm-runtime" {
            exit(await RuntimeCLI.main(Array(CommandLine.arguments.dropFirst())))
        }
        await MVM.main()
    }
}

struct MVM: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mvm",
        abstract: "Run workloads in KVM virtual machines (our own VMM or QEMU/libvirt) and in containers, under one allocator, and compare them.",
        subcommands: [DoctorCommand.self, RunCommand.self, PsCommand.self, GcCommand.self, StopCommand.self, LogsCommand.self, PauseCommand.self, ResumeCommand.self, StatsCommand.self, ExecCommand.self, UpdateCommand.self,
                      ImageCommand.self, RigCommand.self, AllocCommand.self, BenchCommand.self])
}

/// Prints a MicroVMError as one clear line and exits non-zero, instead of ArgumentParser's dump.
func reportingErrors<T>(_ body: () async throws -> T) async throws -> T {
    do { return try await body() }
    catch let e as MicroVMError {
        FileHandleOutput.stderr("mvm: error: \(e.description)\n")
        throw ExitCode(2)
    }
}

enum FileHandleOutput {
    static func stderr(_ s: String) {
        FileHandle.standardError.write(Data(s.utf8))
    }
}

import Foundation
