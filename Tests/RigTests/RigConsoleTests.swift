import Testing
import Foundation
@testable import Rig
import MicroVMCore

@Suite struct RigConsoleTests {
    func run(_ chunks: [String]) -> RigConsole {
        var c = RigConsole()
        for ch in chunks { c.feed(Array(ch.utf8)) }
        return c
    }

    @Test func bootNoiseAndOutputLinesAreNotMarkers() {
        let c = run(["[ 0.1] noise\r\nmore\r\n@@mvm:rig-start uptime=2.50@@\r\n", "a\r\nstatus=9@@\r\n", "\r\n@@mvm:rig-exit status=7@@\r\n"])
        #expect(c.phase == .exited(7))
        #expect(c.guestStartUptime == 2.5)
        #expect(c.bootTail == ["[ 0.1] noise", "more"])
    }

    @Test func markerSplitAcrossChunks() {
        let c = run(["@@mvm:rig-st", "art uptime=1@@\nx\n\n@@mvm:rig-e", "xit status=12", "3@@\n"])
        #expect(c.phase == .exited(123))
    }

    @Test func missingExitIsNotFinished() {
        let c = run(["@@mvm:rig-start uptime=1@@\nhello\n"])
        #expect(c.phase == .running)
        #expect(!c.isFinished)
    }

    @Test func malformedExitFails() {
        let c = run(["@@mvm:rig-start uptime=1@@\n\n@@mvm:rig-exit status=99999999999@@\n"])
        guard case .failed = c.phase else { Issue.record("expected failure, got \(c.phase)"); return }
    }

    @Test func rigErrorBeforeStart() {
        let c = run(["boot\n@@mvm:rig-error insmod kvm failed@@\n"])
        #expect(c.phase == .failed("insmod kvm failed"))
    }

    /// A line longer than the cap is dropped in pieces: a marker after it is still read.
    @Test func hugeLineIsDroppedAndTheMarkerAfterItRead() {
        let big = String(repeating: "z", count: 200_000)
        let c = run(["@@mvm:rig-start uptime=1@@\n", big, "\n\n@@mvm:rig-exit status=0@@\n"])
        #expect(c.phase == .exited(0))
    }

    @Test func bytesAfterExitAreIgnored() {
        var c = RigConsole()
        c.feed(Array("@@mvm:rig-start uptime=1@@\n\n@@mvm:rig-exit status=3@@\n".utf8))
        c.feed(Array("@@mvm:rig-exit status=4@@\nlater\n".utf8))
        #expect(c.phase == .exited(3))
    }
}

@Suite struct RigJobTests {
    @Test func jobScriptQuotesEverything() throws {
        let dir = try RigRunner.makeScratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var o = RigOptions()
        o.workingDirectory = "/work/it's here"
        o.shares = ["/srv/a b"]
        o.environment = ["FOO": "x'y $z"]
        try RigRunner(o).writeJob(command: ["sh", "-c", "echo '$HOME'; exit 7"], scratchDir: dir)
        let job = try String(contentsOfFile: dir + "/job.sh", encoding: .utf8)
        #expect(job.contains("FOO='x'\\''y $z'; export FOO"))
        #expect(job.contains("MVM_IN_RIG='1'"))
        #expect(job.contains("cd '/work/it'\\''s here'"))
        #expect(job.contains("exec 'sh' '-c' 'echo '\\''$HOME'\\''; exit 7'"))
        #expect(try String(contentsOfFile: dir + "/shares", encoding: .utf8) == "rigshare0 /srv/a b\n")
        #expect(try String(contentsOfFile: dir + "/path", encoding: .utf8) == dir + "\n")
    }

    @Test func jobScriptRunsUnderTheHostShell() throws {
        let dir = try RigRunner.makeScratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var o = RigOptions()
        o.workingDirectory = "/"
        o.environment = ["MVM_STATE_DIR": dir + "/state", "ODD": "a'b\"c $d"]
        try RigRunner(o).writeJob(command: ["sh", "-c", "printf '%s|' \"$@\" \"$ODD\" \"$PWD\" \"$MVM_IN_RIG\"", "x", "a b", "it's", "$X"], scratchDir: dir)
        let out = try ProcessRunner.run(["sh", dir + "/job.sh"], timeout: 30)
        #expect(out.status == 0)
        #expect(out.stdoutText == "a b|it's|$X|a'b\"c $d|/|1|")
    }

    @Test func aWorkingDirectoryUnderTmpIsSharedAutomatically() throws {
        var o = RigOptions()
        o.workingDirectory = "/tmp/ci/checkout"
        #expect(RigRunner(o).shares == ["/tmp/ci/checkout"])
        o.shares = ["/tmp/ci"]
        #expect(RigRunner(o).shares == ["/tmp/ci"], "already covered by a share")
        o.shares = ["/tmp/cix"]
        #expect(RigRunner(o).shares == ["/tmp/cix", "/tmp/ci/checkout"], "a sibling with a common prefix covers nothing")
        o.shares = []
        o.workingDirectory = "/work/checkout"
        #expect(RigRunner(o).shares.isEmpty)
        o.workingDirectory = "/tmpfoo"
        #expect(RigRunner(o).shares.isEmpty)
        o.workingDirectory = "/run/user/0/x"
        #expect(RigRunner(o).shares == ["/run/user/0/x"])
    }

    @Test func rejectsRelativeAndNewlinePaths() throws {
        let dir = try RigRunner.makeScratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var o = RigOptions()
        o.shares = ["relative"]
        #expect(throws: (any Error).self) { try RigRunner(o).writeJob(command: ["true"], scratchDir: dir) }
        o.shares = ["/a\nb"]
        #expect(throws: (any Error).self) { try RigRunner(o).writeJob(command: ["true"], scratchDir: dir) }
    }

    @Test func emptyCommandIsRejected() {
        #expect(throws: (any Error).self) { try RigRunner().run(command: []) }
    }

    @Test func statusNamesWhatIsMissing() {
        let c = Rig.status(sourceDirectory: "/nonexistent")
        #expect(!c.usable)
        #expect(c.fix != nil)
    }
}
