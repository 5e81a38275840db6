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

@Suite(.timeLimit(.minutes(1))) struct ChildProcessTests {
    @Test func exitStatusOnceExited() throws {
        let c = try ChildProcess(["sh", "-c", "exit 7"])
        #expect(c.wait().status == 7)
        #expect(c.exitStatus == 7)
        #expect(!c.isRunning)
    }

    @Test func aKillReadsTheShellWay() throws {
        let c = try ChildProcess(["sleep", "30"])
        #expect(c.wait(upTo: 0.05) == nil)
        #expect(c.isRunning)
        c.signal(SIGKILL)
        #expect(c.wait().status == 128 + SIGKILL)
        c.signal(SIGKILL)  // after the reap: a no-op, never another process
    }

    @Test func timeoutKillsAndReports() throws {
        let r = try ChildProcess(["sleep", "30"]).wait(timeout: 0.2)
        #expect(r.timedOut)
        #expect(r.status == 128 + SIGKILL)
    }

    @Test func concurrentWaitersSeeTheSameStatus() async throws {
        let c = try ChildProcess(["sh", "-c", "sleep 0.2; exit 3"])
        async let a = Task.detached { c.wait().status }.value
        async let b = Task.detached { c.wait(timeout: 10).status }.value
        let (x, y) = await (a, b)
        #expect(x == 3 && y == 3)
    }

    @Test func inputToAProgramThatExitsEarlyDoesNotKillUs() throws {
        // More than a pipe holds, to a program that reads nothing: EPIPE, not SIGPIPE.
        let out = try ProcessRunner.run(["true"], input: Data(count: 1 << 20))
        #expect(out.status == 0)
    }

    @Test func largeInputAndOutputDoNotDeadlock() throws {
        let big = Data((0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0) })
        let out = try ProcessRunner.run(["cat"], input: big, timeout: 30)
        #expect(!out.timedOut)
        #expect(out.stdout == big)
    }

    @Test func aGrandchildHoldingStdinDoesNotBlockTheInputWriter() throws {
        // sh exits at once; the background sleep keeps stdin open and never reads it. More input
        // than a pipe holds must not keep the run waiting on that sleep.
        let out = try ProcessRunner.run(["sh", "-c", "exec 3<&0; sleep 20 <&3 >/dev/null 2>&1 & exit 5"],
                                        input: Data(count: 1 << 20), timeout: 30)
        #expect(out.status == 5)
        #expect(!out.timedOut)
    }

    @Test func aTimedWaitEndsWhenTheChildExitsNotAtTheDeadline() throws {
        let c = try ChildProcess(["sh", "-c", "sleep 0.2; exit 4"])
        let start = Monotonic.seconds()
        #expect(c.wait(upTo: 50) == 4)
        #expect(Monotonic.seconds() - start < 25, "woken by the exit, not by the 50 s deadline")
    }

    @Test func aDescriptorBecomesTheChildsOutput() throws {
        let p = try ProcessRunner.makePipe()
        let c = try ChildProcess(["sh", "-c", "echo via-fd"], stdout: .descriptor(p.write))
        close(p.write)
        #expect(c.wait().status == 0)
        let text = String(decoding: FileHandle(fileDescriptor: p.read, closeOnDealloc: true).readDataToEndOfFile(), as: UTF8.self)
        #expect(text == "via-fd\n")
    }
}
