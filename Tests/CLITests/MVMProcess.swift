import Foundation
import MicroVMCore

/// Runs the built `mvm` binary, which SwiftPM places next to the test bundle.
enum MVM {
    static var binary: String? {
        var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for _ in 0..<4 {
            let candidate = dir.appendingPathComponent("mvm").path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
            dir.deleteLastPathComponent()
        }
        let fallback = Paths.sourceDirectory() + "/.build/debug/mvm"
        return FileManager.default.isExecutableFile(atPath: fallback) ? fallback : nil
    }

    static func run(_ args: [String], environment: [String: String] = [:], timeout: Double = 120) throws -> ProcessRunner.Output {
        guard let bin = binary else { throw MicroVMError.notFound("the mvm binary was not built (swift build --build-tests builds it)") }
        return try ProcessRunner.run([bin] + args, environment: environment, timeout: timeout)
    }
}
