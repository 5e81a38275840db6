import ArgumentParser
import MicroVM

@main
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
