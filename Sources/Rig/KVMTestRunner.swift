import Foundation
import MicroVMCore
import Host

/// Runs a command where KVM is hardware: directly when this host's KVM is, otherwise inside the
/// rig. Tests that need a real KVM (Linux boots under the direct VMM) go through it.
public enum KVMTestRunner {
    /// Whether commands run directly (true) or in the rig (false) on this host.
    public static var hostHasHardwareKVM: Bool {
        RigEnvironment.isInside || HostProfile.current().kvm.verdict == .hardware
    }

    public static func run(command: [String], options: RigOptions = RigOptions(),
                           streamOutput: ((Data) -> Void)? = nil) throws -> RigResult {
        guard !hostHasHardwareKVM else {
            let started = Date()
            let out = try ProcessRunner.run(command, currentDirectory: options.workingDirectory, timeout: options.timeout)
            let wall = Date().timeIntervalSince(started)
            if out.timedOut {
                throw MicroVMError(.timeout, "'\(command.joined(separator: " "))' did not finish within \(Int(options.timeout)) s and was killed")
            }
            let output = out.stdout + out.stderr
            streamOutput?(output)
            return RigResult(status: out.status, output: output, bootSeconds: 0, wallSeconds: wall, guestUptimeAtStart: nil)
        }
        return try RigRunner(options).run(command: command, streamOutput: streamOutput)
    }
}

/// Finds the built `mvm` binary for tests: it sits beside the test bundle in the build directory.
public enum MvmBinary {
    public static func find() throws -> String {
        if let p = ProcessInfo.processInfo.environment["MVM_BINARY"], FileManager.default.isExecutableFile(atPath: p) { return p }
        var candidates: [String] = []
        for arg in [CommandLine.arguments.first ?? "", Bundle.main.executablePath ?? ""] where !arg.isEmpty {
            var url = URL(fileURLWithPath: arg).resolvingSymlinksInPath()
            // The bundle may be a directory (X.xctest/…) or the executable itself.
            for _ in 0..<4 {
                url.deleteLastPathComponent()
                candidates.append(url.path + "/mvm")
            }
        }
        if let hit = candidates.first(where: { FileManager.default.isExecutableFile(atPath: $0) }) { return hit }
        throw MicroVMError.notFound("the mvm binary is not next to the test bundle (looked in \(candidates.prefix(4).joined(separator: ", "))): build it with 'swift build --build-tests' or set MVM_BINARY")
    }
}
