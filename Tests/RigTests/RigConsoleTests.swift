import Testing
import Foundation
@testable import Rig
import MicroVMCore
import Host

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

@Suite struct RigWatchdogTests {
    let t0 = Date(timeIntervalSince1970: 1_000_000)

    @Test func stallsOnlyAfterTheLimitWithoutASign() {
        var w = RigWatchdog(limit: 60, pid: getpid(), now: t0)
        w.start(now: t0)
        #expect(!w.isStalled(now: t0.addingTimeInterval(59)))
        w.sign(now: t0.addingTimeInterval(59))
        #expect(!w.isStalled(now: t0.addingTimeInterval(118)))
        #expect(w.isStalled(now: t0.addingTimeInterval(119)))
        #expect(w.longestSilence == 59)
    }

    /// With an output limit, a beating kernel whose command writes nothing is stuck; output
    /// resets it, a heartbeat does not.
    @Test func aQuietCommandIsStuckDespiteTheHeartbeat() {
        var w = RigWatchdog(limit: 180, outputLimit: 100, pid: getpid(), now: t0)
        #expect(!w.isStuck(now: t0.addingTimeInterval(500)), "the boot before the command does not count")
        w.start(now: t0)
        for beat in stride(from: 10, through: 90, by: 10) { w.heartbeat("\(beat).0", now: t0.addingTimeInterval(Double(beat))) }
        w.output(now: t0.addingTimeInterval(95))
        for beat in stride(from: 100, through: 190, by: 10) { w.heartbeat("\(beat).0", now: t0.addingTimeInterval(Double(beat))) }
        #expect(!w.isStalled(now: t0.addingTimeInterval(194)))
        #expect(w.isStuck(now: t0.addingTimeInterval(195)) && w.isStalled(now: t0.addingTimeInterval(195)))
        var off = RigWatchdog(limit: 180, pid: getpid(), now: t0)
        off.start(now: t0)
        off.heartbeat("1.0", now: t0.addingTimeInterval(170))
        #expect(!off.isStalled(now: t0.addingTimeInterval(300)), "no output limit: quiet is fine while it beats")
    }

    @Test func aHeartbeatCountsOnlyWhenItChanges() {
        var w = RigWatchdog(limit: 30, pid: getpid(), now: t0)
        w.start(now: t0)
        w.heartbeat("12.50\n", now: t0.addingTimeInterval(10))
        w.heartbeat("12.50\n", now: t0.addingTimeInterval(35))
        w.heartbeat(nil, now: t0.addingTimeInterval(36))
        w.heartbeat("", now: t0.addingTimeInterval(37))
        #expect(w.lastHeartbeat == "12.50")
        #expect(w.isStalled(now: t0.addingTimeInterval(40)), "a repeated heartbeat is no sign of life")
        w.heartbeat("22.51", now: t0.addingTimeInterval(41))
        #expect(!w.isStalled(now: t0.addingTimeInterval(41)))
        #expect(w.longestSilence == 31)
    }

    @Test func theQuietBootIsNotASilenceAndZeroTurnsItOff() {
        var w = RigWatchdog(limit: 30, pid: getpid(), now: t0)
        w.sign(now: t0.addingTimeInterval(500))
        w.start(now: t0.addingTimeInterval(501))
        w.sign(now: t0.addingTimeInterval(502))
        #expect(w.longestSilence == 1)
        let off = RigWatchdog(limit: 0, pid: getpid(), now: t0)
        #expect(!off.isStalled(now: t0.addingTimeInterval(1e6)))
    }

    @Test func cpuTimeIsReadPastACommandNameWithParentheses() {
        let hz = Double(sysconf(Int32(_SC_CLK_TCK)))
        let stat = "4242 (qemu) (x) y) R 1 4242 4242 0 -1 4194560 100 0 0 0 \(Int(3 * hz)) \(Int(hz)) 0 0 20 0 3 0 12345"
        #expect(ProcessIdentity.statFields(stat).flatMap(ProcessIdentity.cpuSeconds(fields:)) == 4)
        #expect(ProcessIdentity.statFields("4242 (qemu R 1") == nil)
        #expect(ProcessIdentity.statFields("4242 (qemu) R 1 2").flatMap(ProcessIdentity.cpuSeconds(fields:)) == nil)
        #expect(ProcessIdentity.parseStat("7 (a (b) c) S 1 2").map { [String($0.comm)] + $0.fields.map(String.init) } == ["a (b) c", "S", "1", "2"])
        #expect((ProcessIdentity.cpuSeconds(pid: getpid()) ?? -1) >= 0)
    }

    @Test func vcpusAreSummarisedFromTheMonitor() {
        let text = """
            CPU#0
            RAX=0000000000000000 RBX=ffffffff82a0a940
            RIP=ffffffff81e3c8ab RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
            EFER=0000000000001d01
            XMM00=0000000000000000 0000000000000000

            CPU#1
            EIP=000fd09a EFL=00000002 [-------] CPL=3 II=0 A20=1 SMM=0 HLT=0
            EFER=0000000000000000
            """
        #expect(RigMonitor.vcpuSummary(text) == [
            "CPU#0 RIP=ffffffff81e3c8ab CPL=0 HLT=1 EFER=0000000000001d01",
            "CPU#1 EIP=000fd09a CPL=3 HLT=0 EFER=0000000000000000"])
        #expect(RigMonitor.vcpuSummary(text.replacingOccurrences(of: "\n", with: "\r\n")) == RigMonitor.vcpuSummary(text),
                "QEMU's monitor ends lines with CRLF")
        #expect(RigMonitor.vcpuSummary("garbage\n").isEmpty)
    }

    @Test func aMonitorThatIsNotThereGivesNothingAtOnce() {
        let started = Date()
        #expect(RigMonitor.human("info cpus", socket: "/nonexistent/qmp") == nil)
        #expect(RigMonitor.human("info cpus", socket: String(repeating: "x", count: 200)) == nil)
        #expect(Date().timeIntervalSince(started) < 5)
    }

    @Test func theRunningConsoleKeepsTheKernelsLinesButNotTheHeartbeat() {
        var c = RigConsole()
        c.feed(Array("boot\n@@mvm:rig-start uptime=3.2@@\n@@mvm:rig-alive uptime=13.2@@\n[  20.1] Kernel panic - not syncing: sysrq triggered crash\n".utf8))
        #expect(c.phase == .running)
        #expect(c.runTail == ["[  20.1] Kernel panic - not syncing: sysrq triggered crash"])
        for i in 0..<50 { c.feed(Array("line \(i)\n".utf8)) }
        let ended = RigEnded(console: c.runTail, qemuStderr: "", output: Data("x".utf8))
        #expect(ended.description.contains("its kernel said: [  20.1] Kernel panic - not syncing: sysrq triggered crash"), "\(ended)")
        #expect(ended.description.contains("line 49") && !ended.description.contains("line 40 |") && ended.outputText == "x")
        for i in 50..<200 { c.feed(Array("line \(i)\n".utf8)) }
        #expect(c.runTail.count == 100 && c.runTail.last == "line 199", "the tail is bounded")
    }

    /// A kernel whose CPUs are stuck prints its lockup again every half minute: those lines are
    /// no sign of life (the rig then counts as stalled), and the stall quotes them.
    @Test func lockupReportsAreNoSignOfLife() {
        var c = RigConsole()
        c.feed(Array("@@mvm:rig-start uptime=3.2@@\n".utf8))
        let alive = c.linesOfLife
        c.feed(Array("[  308.63] watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [oot.default-qos:173]\n".utf8))
        c.feed(Array("[  330.10] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n".utf8))
        #expect(c.linesOfLife == alive && c.phase == .running)
        #expect(c.lockups.count == 2 && c.lockups[0].contains("soft lockup - CPU#0"))
        c.feed(Array("@@mvm:rig-alive uptime=340.0@@\n".utf8))
        #expect(c.linesOfLife == alive + 1, "a heartbeat is a line of life")
        for i in 0..<10 { c.feed(Array("[ \(400 + i)] watchdog: BUG: soft lockup - CPU#1 stuck for \(i)s!\n".utf8)) }
        #expect(c.lockups.count == 4 && c.lockups.last?.contains("stuck for 9s") == true, "the last four are kept")
        let s = RigStall(silentSeconds: 180, qemuCPUPercent: 150, vcpus: [], lockups: c.lockups, output: Data())
        #expect(s.description.contains("its kernel reported: [ 406] watchdog: BUG: soft lockup"), "\(s)")
    }

    @Test func aStallSaysWhatItSaw() {
        let s = RigStall(silentSeconds: 181.4, qemuCPUPercent: 197, lastHeartbeat: "612.30",
                         vcpus: ["CPU#0 RIP=ffffffff81e3c8ab CPL=0 HLT=0"], output: Data("partial".utf8))
        #expect(s.description.contains("for 181 s"))
        #expect(s.description.contains("uptime 612.30"))
        #expect(s.description.contains("197% of a CPU") && s.description.contains("spinning"))
        #expect(s.description.contains("CPU#0 RIP=ffffffff81e3c8ab"))
        #expect(s.outputText == "partial")
    }
}
