import Testing
import Foundation
@testable import MicroVMCore

@Suite struct ProcessRunnerTests {
    @Test func capturesOutputAndStatus() throws {
        let out = try ProcessRunner.run(["sh", "-c", "echo out; echo err >&2; exit 4"])
        #expect(out.status == 4)
        #expect(out.stdoutText == "out\n")
        #expect(out.stderrText == "err\n")
    }

    @Test(.timeLimit(.minutes(1)))
    func aGrandchildHoldingThePipeDoesNotBlock() throws {
        // The background sleep inherits stdout; the run must still end when sh exits.
        let out = try ProcessRunner.run(["sh", "-c", "sleep 20 & echo started"])
        #expect(out.status == 0)
        #expect(out.stdoutText == "started\n")
    }

    @Test func timeoutKills() throws {
        let out = try ProcessRunner.run(["sleep", "30"], timeout: 0.5)
        #expect(out.timedOut)
    }

    @Test func missingProgramNamesThePackage() {
        #expect {
            try ProcessRunner.run(["mvm-no-such-program"], package: "mvm-pkg")
        } throws: { "\($0)".contains("apt-get install mvm-pkg") }
    }

    @Test func inputIsDelivered() throws {
        let out = try ProcessRunner.run(["cat"], input: Data("piped".utf8))
        #expect(out.stdoutText == "piped")
    }
}

@Suite struct ChildSignalMaskTests {
    @Test func childrenStartWithNoBlockedSignals() async throws {
        // Run from a concurrency-pool thread, where signals are usually blocked.
        let out = try await Task.detached { try ProcessRunner.run(["sh", "-c", "grep SigBlk /proc/self/status"]) }.value
        #expect(out.stdoutText.trimmingCharacters(in: .whitespacesAndNewlines) == "SigBlk:\t0000000000000000")
    }
}
