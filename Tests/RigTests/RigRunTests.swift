import Testing
import Foundation
import MicroVMCore
import Images
@testable import Rig

/// Whether rig boots can run here: QEMU, the kernel and its modules, and not already inside a rig
/// (a rig in a rig would be TCG under TCG, far too slow).
enum RigGate {
    static let status = Rig.status()
    static let usable = status.usable && ProcessInfo.processInfo.environment["MVM_IN_RIG"] != "1"
    static let reason = ProcessInfo.processInfo.environment["MVM_IN_RIG"] == "1"
        ? "already inside the rig" : "rig not usable here: \(status.detail) (\(status.fix ?? ""))"

    static func options(timeout: Double = 300) -> RigOptions {
        var o = RigOptions()
        o.timeout = timeout
        o.memoryMiB = 2048
        return o
    }

    /// Runs `script` in a rig that must be killed as stalled or stuck, well before its
    /// timeout and leaving no QEMU; returns the stall.
    static func stall(_ options: RigOptions, _ script: String) throws -> RigStall {
        let started = Date()
        defer {
            #expect(Date().timeIntervalSince(started) < options.timeout * 2 / 3, "killed well before the rig's timeout")
            #expect((try? leftoverQEMUs())?.isEmpty == true, "the killed rig's QEMU must be gone")
        }
        do {
            let r = try RigRunner(options).run(command: ["sh", "-c", script])
            throw MicroVMError(.internalError, "the rig returned status \(r.status) instead of being killed as stalled")
        } catch let stall as RigStall {
            print("rig stall: \(stall)")
            return stall
        }
    }

    /// No rig QEMU started by this process may be left running.
    static func leftoverQEMUs() throws -> String {
        let out = try ProcessRunner.run(["pgrep", "-af", Rig.processMarker + "\(getpid())-"], timeout: 10)
        return out.stdoutText.split(separator: "\n").filter { $0.contains("qemu-system") }.joined(separator: "\n")
    }
}

@Suite(.serialized, .timeLimit(.minutes(20)), .enabled(if: RigGate.usable, "\(RigGate.reason)"))
struct RigRunTests {
    @Test func cpuHasSVMAndTheRequestedCPUs() throws {
        var o = RigGate.options()
        o.cpus = 2
        let r = try RigRunner(o).run(command: ["sh", "-c", "grep -c -w svm /proc/cpuinfo; nproc; ls -l /dev/kvm; echo \"$MVM_IN_RIG $HOME\"; pwd"])
        print("rig boot \(r.bootSeconds) s (L2 uptime \(r.guestUptimeAtStart ?? -1) s), wall \(r.wallSeconds) s")
        let lines = r.outputText.split(separator: "\n").map(String.init)
        #expect(r.status == 0, "output: \(r.outputText)")
        #expect(lines.count == 5, "output: \(r.outputText)")
        #expect(lines.first == "2", "both vCPUs must show svm")
        #expect(lines.dropFirst().first == "2", "the L2 kernel must see 2 CPUs")
        #expect(lines.count > 2 && lines[2].hasPrefix("crw") && lines[2].hasSuffix("/dev/kvm"))
        #expect(lines.count > 3 && lines[3] == "1 /tmp")
        #expect(lines.last == FileManager.default.currentDirectoryPath)
        #expect(try RigGate.leftoverQEMUs().isEmpty)
    }

    @Test func exitStatusPropagates() throws {
        let r = try RigRunner(RigGate.options()).run(command: ["sh", "-c", "echo out; echo err >&2; exit 7"])
        #expect(r.status == 7)
        #expect(r.outputText == "out\nerr\n")
    }

    @Test func manyLinesStreamIntactAndFilesComeBack() throws {
        let chunks = ChunkBox()
        var fromScratch = ""
        let r = try RigRunner(RigGate.options()).run(
            command: ["sh", "-c", "seq 1 10000; sleep 2; seq 10001 20000; printf 'no newline'; echo done > \"$MVM_RIG_SCRATCH/result\""],
            afterRun: { dir in fromScratch = (try? String(contentsOfFile: dir + "/result", encoding: .utf8)) ?? "" },
            streamOutput: { chunks.append($0) })
        let expected = (1...20000).map(String.init).joined(separator: "\n") + "\nno newline"
        #expect(r.status == 0)
        #expect(r.outputText == expected)
        #expect(chunks.joined() == r.output, "streamed chunks must add up to the output")
        #expect(chunks.count > 1, "output must arrive in more than one piece while the command runs")
        #expect(fromScratch == "done\n")
    }

    @Test func hungCommandIsKilledByTimeout() throws {
        let started = Date()
        do {
            let r = try RigRunner(RigGate.options(timeout: 90)).run(command: ["sh", "-c", "echo before-the-hang; sleep 100000"])
            Issue.record("a hung command returned status \(r.status) instead of timing out")
        } catch let e as RigTimedOut {
            #expect(e.timeout == 90, "\(e)")
            #expect(e.outputText == "before-the-hang\n", "what the command wrote comes with the error")
        }
        #expect(Date().timeIntervalSince(started) < 200)
        #expect(try RigGate.leftoverQEMUs().isEmpty, "the timed-out QEMU must be gone")
    }

    /// The command stops the rig's heartbeat (its init's other children) and goes quiet, as a
    /// stalled kernel would: the watchdog kills the rig well before its timeout, with QEMU's
    /// view of the vCPUs and the output so far.
    @Test func aSilentRigIsKilledAsStalled() throws {
        var o = RigGate.options(timeout: 600)
        o.stallTimeout = 30
        let stall = try RigGate.stall(o, "echo before-the-silence; for p in $(pgrep -P 1); do [ $p = $$ ] || kill -STOP $p; done; sleep 500")
        #expect(stall.silentSeconds >= 30 && stall.silentSeconds < 60, "\(stall)")
        #expect(stall.outputText == "before-the-silence\n")
        #expect(stall.lastHeartbeat != nil, "the heartbeat ran before it was stopped")
        #expect(stall.vcpus.count == 2 && stall.vcpus.allSatisfy { $0.contains("IP=") }, "\(stall.vcpus)")
        #expect(stall.qemuCPUPercent != nil)
    }

    /// The command writes a line and then nothing, while the rig's kernel goes on beating: with
    /// an output limit the rig is killed as stuck well before its timeout, with the output so far.
    @Test func aQuietCommandIsKilledAsStuck() throws {
        var o = RigGate.options(timeout: 600)
        o.outputTimeout = 30
        let stall = try RigGate.stall(o, "echo before-the-quiet; sleep 500")
        #expect((stall.outputSilentSeconds ?? 0) >= 30 && (stall.outputSilentSeconds ?? 99) < 60, "\(stall)")
        #expect(stall.silentSeconds < 30, "the kernel still beat: \(stall)")
        #expect(stall.outputText == "before-the-quiet\n")
        #expect(stall.description.contains("no output for"))
    }

    /// The command crashes the rig's kernel (sysrq c): QEMU ends (-no-reboot), and the error is
    /// a `RigEnded` whose console lines carry the kernel's panic, with the output so far.
    @Test func aRigWhoseKernelDiesSaysHow() throws {
        do {
            let r = try RigRunner(RigGate.options(timeout: 300)).run(command: ["sh", "-c", "echo before-the-crash; sleep 1; echo c > /proc/sysrq-trigger; sleep 100"])
            Issue.record("a crashed rig returned status \(r.status)")
        } catch let ended as RigEnded {
            print("rig ended: \(ended)")
            #expect(ended.outputText == "before-the-crash\n")
            #expect(ended.console.contains { $0.contains("Kernel panic") }, "\(ended.console)")
            #expect(!ended.description.contains("TCG doesn't support"), "QEMU's start-up warnings are left out")
        }
        #expect(try RigGate.leftoverQEMUs().isEmpty)
    }

    @Test func missingCommandIsStatus127() throws {
        let r = try RigRunner(RigGate.options()).run(command: ["/nonexistent/cmd"])
        #expect(r.status == 127)
    }

    @Test func cliRunsAndPropagatesStatus() throws {
        let mvm = try MvmBinary.find()
        let out = try ProcessRunner.run([mvm, "rig", "run", "--memory", "2048", "--timeout", "300", "--", "sh", "-c", "echo via-cli; exit 5"], timeout: 400)
        #expect(out.status == 5, "stderr: \(out.stderrText)")
        #expect(out.stdoutText == "via-cli\n")
        #expect(try RigGate.leftoverQEMUs().isEmpty)
    }

    /// A SIGKILL of `mvm rig run` (or of a whole test run) lets it clean nothing up: its QEMU
    /// must end all the same, and the run's scratch directory go, through the lifeline it held.
    @Test func aKilledMvmTakesItsRigWithIt() throws {
        let mvm = try MvmBinary.find()
        let run = try ChildProcess([mvm, "rig", "run", "--timeout", "300", "--", "sleep", "250"])
        defer { run.signal(SIGKILL); _ = run.wait() }
        let marker = Rig.processMarker + "\(run.pid)-"
        func qemu() -> String {
            let out = (try? ProcessRunner.run(["pgrep", "-af", marker], timeout: 10).stdoutText) ?? ""
            return out.split(separator: "\n").filter { $0.contains("qemu-system") }.joined(separator: "\n")
        }
        var deadline = Date() + 120
        while qemu().isEmpty, Date() < deadline { usleep(200_000) }
        let line = qemu()
        try #require(!line.isEmpty, "the rig's QEMU never started")
        let words = line.split(separator: " ")
        let pidfile = try #require(words.firstIndex(of: "-pidfile").map { String(words[$0 + 1]) }, "no -pidfile in: \(line)")
        let scratch = (pidfile as NSString).deletingLastPathComponent
        #expect(FileManager.default.fileExists(atPath: scratch))
        usleep(2_000_000)  // into the boot
        run.signal(SIGKILL)
        _ = run.wait()
        deadline = Date() + 20
        while !qemu().isEmpty || FileManager.default.fileExists(atPath: scratch), Date() < deadline { usleep(200_000) }
        #expect(qemu().isEmpty, "the killed run's QEMU is still running: \(qemu())")
        #expect(!FileManager.default.fileExists(atPath: scratch), "the killed run's scratch directory \(scratch) is left")
    }

    /// A guest loop at CPL0 on the rig's KVM: 10 million iterations take about 0.1 s there. The
    /// nested stack has been seen to hang a run like this for good (the rig itself alive), so
    /// each attempt has 60 s, and a second one follows a hung first.
    @Test func cpl0GuestCodeRunsAtHardwareSpeed() throws {
        // shared/ lies beside the project's root.
        let probe = (Paths.sourceDirectory() as NSString).deletingLastPathComponent + "/shared/probes/kvm-cpl0-loop.c"
        try #require(FileManager.default.fileExists(atPath: probe) && ProcessRunner.which("gcc") != nil, "needs gcc and \(probe)")
        let r = try RigRunner(RigGate.options()).run(
            command: ["sh", "-c", "for i in 1 2; do timeout 60 \"$MVM_RIG_SCRATCH/cpl0\" 10000000 && exit 0; echo \"attempt $i: status $?\"; done; exit 1"],
            scratch: { dir in try ProcessRunner.check(["gcc", "-O2", "-static", "-o", dir + "/cpl0", probe], timeout: 120) })
        print("CPL0 loop inside the rig: \(r.outputText.trimmingCharacters(in: .whitespacesAndNewlines))")
        #expect(r.status == 0)
        #expect(r.outputText.contains("ns/iter"))
    }
}

/// The project's own KVM code against a real KVM: inside the rig, or directly where the host has one.
/// Every check shares one rig session (`RigKVMSession`): each Linux boot inside the rig costs
/// minutes of TCG, so the rig boots once and runs the doctor and the three direct boots in turn.
@Suite(.serialized, .timeLimit(.minutes(40)), .enabled(if: RigGate.usable || KVMTestRunner.hostHasHardwareKVM, "\(RigGate.reason)"))
struct RigKVMTests {
    func step(_ name: String) throws -> RigKVMSession.Step {
        let steps = try RigKVMSession.shared.get()
        let step = try #require(steps[name], "step \(name) did not run\(RigKVMSession.notRun.map { ": \($0)" } ?? ""); rig output: \(RigKVMSession.rawOutput.suffix(3000))")
        if let first = step.firstAttempt { print("rig step \(name) ran twice: its first guest triple-faulted, or it ran past its time:\n\(first.suffix(3000))") }
        return step
    }

    @Test func doctorSeesHardwareKVM() throws {
        let s = try step("doctor")
        #expect(s.status == 0, "doctor: \(s.output.suffix(2000))")
        // The step prints the report's "kvm" : { … } member.
        guard let open = s.output.firstIndex(of: "{"), let close = s.output.lastIndex(of: "}"), open < close,
              let kvm = try? JSONSerialization.jsonObject(with: Data(s.output[open...close].utf8)) as? [String: Any] else {
            Issue.record("doctor --json output has no KVM object: \(s.output.prefix(2000))")
            return
        }
        #expect(kvm["verdict"] as? String == "hardware", "kvm: \(kvm)")
    }

    @Test func directLinuxBootBzImage() throws {
        let s = try step("bzimage")
        #expect(s.status == 3, "output: \(s.output.suffix(2000))")
        #expect(s.output.contains("hello\n"))
    }

    @Test func directLinuxBootTwoCPUs() throws {
        let s = try step("cpus2")
        #expect(s.status == 3, "output: \(s.output.suffix(2000))")
        #expect(s.output.contains("2\nhello\n"), "the guest must see 2 CPUs: \(s.output.suffix(2000))")
    }

    @Test func directVirtioDevicesInTheGuest() throws {
        let s = try step("devices")
        print("direct VMM in the rig, virtio devices: \(s.output.split(separator: "\n").filter { $0.contains("=") || $0.contains(" on / ") || $0.contains("receiver") }.joined(separator: "; "))")
        #expect(s.status == 3, "output: \(s.output.suffix(2000))")
        #expect(s.output.contains("/dev/vda on / type ext4"), "the rootfs must come from virtio-blk: \(s.output.suffix(2000))")
        #expect(s.output.contains("rng=virtio_rng"))
        #expect(s.output.contains("rngbytes=64\n"))
        #expect(s.output.contains("fio-verify-ok"), "fio's verified write on /dev/vdb failed: \(s.output.suffix(2000))")
        let iops = s.output.split(separator: "\n").first { $0.hasPrefix("randread-iops=") }.flatMap { Double($0.dropFirst(14)) }
        #expect((iops ?? 0) > 0, "no random-read IOPS from fio: \(s.output.suffix(2000))")
        // virtio-net over a tap: the host end answers pings and an iperf3 stream gets through.
        #expect(s.output.contains("eth0=virtio_net"), "eth0 must be virtio-net: \(s.output.suffix(2000))")
        #expect(s.output.contains("ping-ok"), "the guest could not ping the host end of its tap: \(s.output.suffix(2000))")
        // Both ways at once (--bidir): to the guest, the host's large (GSO) frames spread over the
        // page-sized buffers the driver posts, since it took mergeable receive buffers.
        #expect(s.output.contains("mergeable-rx=1"), "the guest's virtio-net did not take mergeable receive buffers: \(s.output.suffix(2000))")
        for way in ["TX-C", "RX-C"] {
            let receiver = s.output.split(separator: "\n").first { $0.contains("receiver") && $0.contains(way) }.map(String.init) ?? ""
            let mbits = receiver.split(separator: " ").firstIndex(of: "Mbits/sec").flatMap { i in Double(receiver.split(separator: " ")[i - 1]) }
            #expect((mbits ?? 0) > 0, "no iperf3 throughput \(way == "TX-C" ? "from the guest to the host" : "from the host to the guest"): \(s.output.suffix(2000))")
        }
        let left = try step("taps-left")
        #expect(left.output.trimmingCharacters(in: .whitespacesAndNewlines) == "0", "the run's tap must be gone: \(left.output)")
    }

    @Test func directVsockReachesTheGuestInit() throws {
        let s = try step("vsock")
        #expect(s.output.contains("vsock-ok"), "no answer from the guest agent: \(s.output.suffix(2000))")
        #expect(s.output.contains("to-stderr"), "the process's stderr comes back too: \(s.output.suffix(2000))")
        #expect(s.output.contains("vm-status=9"), "ending the guest's sleep over vsock must end the run with its status: \(s.output.suffix(2000))")
        #expect(s.output.contains("exec-ran-in-") && s.output.contains("exec-status=5"), "mvm exec through the guest's vsock agent: \(s.output.suffix(2000))")
        #expect(s.output.contains("stopped waiting: the process in 'rigvs' did not end on signal 15") && !s.output.contains("giveup-status=0"),
                "a second TERM ends mvm exec's wait on a process that ignores it: \(s.output.suffix(2000))")
    }

    @Test func directInstancesAreListedEnforcedStoppedAndCleanedUp() throws {
        let s = try step("lifecycle")
        #expect(s.output.contains("rigps") && s.output.contains("direct"), "\(s.output)")
        #expect(s.output.contains("cpu.max=100000 100000"), "\(s.output)")
        #expect(s.output.contains("memory.max=335544320"), "256 MiB of guest RAM plus the VMM's 64 MiB: \(s.output)")
        #expect(s.output.contains("logs-boot=1"), "\(s.output)")
        #expect(s.output.contains("stop=0"), "\(s.output)")
        #expect(s.output.contains("run-status=143"), "\(s.output)")
        #expect(s.output.contains("Ctrl-Alt-Del sent; the guest reset"), "mvm stop must end the guest through Ctrl-Alt-Del: \(s.output)")
        #expect(s.output.contains("cgroup-gone") && s.output.contains("grants-left=0"), "\(s.output)")
    }

    @Test func vmmIsDrivenThroughALinuxBootByHTTP() throws {
        let s = try step("vmm-api")
        for ok in ["machine-config=HTTP/1.1 204", "boot-source=HTTP/1.1 204", "drive=HTTP/1.1 204", "start=HTTP/1.1 204",
                   "guest-up=1", "state-running=1", "pause=HTTP/1.1 204", "state-paused=1", "resume=HTTP/1.1 204", "cad=HTTP/1.1 204"] {
            #expect(s.output.contains(ok), "\(ok) expected: \(s.output.suffix(2000))")
        }
        #expect(!s.output.contains("cad-timeout") && s.output.contains("vmm-status=0"), "Ctrl-Alt-Del must reboot Linux, which ends the VMM: \(s.output.suffix(2000))")
    }

    @Test func aKilledRunLeavesNothingAtAnyPhaseAndItsVMMIsJailed() throws {
        let s = try step("kill-phases")
        for phase in ["granted", "spawned"] { #expect(s.output.contains("state-\(phase)=T"), "the run never stopped at \(phase): \(s.output)") }
        for phase in ["granted", "spawned", "running"] {
            #expect(s.output.contains("left-\(phase): ps=0 grants=0 taps=0 cgroups=0 vmm=0"), "left after a kill at \(phase): \(s.output)")
        }
        // NSpid: the rig's pid, then 1; no capability; no_new_privs; a seccomp filter.
        #expect(s.output.range(of: #"jail-running: NSpid: \d+ 1 CapEff: 0000000000000000 NoNewPrivs: 1 Seccomp: 2"#, options: .regularExpression) != nil,
                "the VMM must run jailed: \(s.output)")
    }

    /// Issue 17's bar: a guest that frees 256 MiB gives at least 200 MiB back to the host within
    /// seconds (free page reporting), and `mvm update --memory` moves the guest's available memory.
    @Test func aBalloonedGuestGivesFreedMemoryBackAndIsResizedLive() throws {
        let s = try step("balloon")
        func value(_ key: String) -> Int? {
            s.output.split(separator: "\n").first { $0.hasPrefix(key + "=") }.flatMap { Int($0.dropFirst(key.count + 1).prefix { $0.isNumber }) }
        }
        print("direct VMM in the rig, balloon: " + ["rss-idle", "rss-full", "rss-freed", "avail-before", "avail-shrunk", "avail-grown"]
            .map { "\($0)=\(value($0).map(String.init) ?? "?") KiB" }.joined(separator: ", "))
        #expect(value("balloon-driver") == 1, "the guest must bind virtio_balloon: \(s.output)")
        #expect(s.output.contains("filled"), "the guest must hold 256 MiB: \(s.output)")
        let full = try #require(value("rss-full")), freed = try #require(value("rss-freed"))
        #expect(full - freed >= 200 << 10, "256 MiB freed in the guest must give at least 200 MiB back: \(s.output)")
        #expect(s.output.contains("shrink=0") && s.output.contains("grow=0"), "\(s.output)")
        let before = try #require(value("avail-before")), shrunk = try #require(value("avail-shrunk")), grown = try #require(value("avail-grown"))
        #expect(before - shrunk >= 200 << 10, "a 256 MiB balloon must take the guest's available memory down: \(s.output)")
        #expect(grown - shrunk >= 200 << 10, "emptying it must give it back: \(s.output)")
        #expect(s.output.contains("mvm_vmm_balloon_actual_bytes 268435456"), "\(s.output)")
        #expect(s.output.contains("grants-left=0"), "\(s.output)")
    }

    /// A hosted VM on nested KVM: its vCPUs plugged in, out and in again, and `mvm exec`
    /// through its init's vsock shell.
    @Test func aHostedVMGetsAndLosesVCPUsLive() throws {
        let s = try step("hosted-vcpus")
        for line in ["boot-online=0", "grow=0", "grown-online=0-1", "shrink=0", "shrunk-online=0", "regrow=0", "regrown-online=0-1",
                     "hosted-exec-ran-on-2-cpus", "exec-status=4", "grants-left=0"] {
            #expect(s.output.contains(line + "\n"), "\(line): \(s.output)")
        }
    }

    @Test func containerdRunsABusyboxImageInADirectVM() throws {
        let s = try step("containerd")
        #expect(s.output.contains("imported"), "\(s.output)")
        #expect(s.output.contains("hi from ") && s.output.contains("run=3"), "\(s.output)")
        #expect(s.output.contains("direct") && s.output.contains("STOPPED"), "the second ran in the direct VMM and was stopped: \(s.output)")
        #expect(s.output.contains("exec-out init") && s.output.contains("exec-err") && s.output.contains("exec=4"),
                "ctr task exec runs in the VM, beside its init, with its stdout, stderr and status: \(s.output)")
        #expect(s.output.contains("through-stdin\nexec-stdin=0"), "ctr task exec's stdin reaches the process: \(s.output)")
        #expect(s.output.contains("streamed=1 while RUNNING"), "the process's output must come while it runs: \(s.output)")
        #expect(s.output.contains("exec-user=65534 exec-nofile=1024"), "an exec'd process's user and rlimits: \(s.output)")
        #expect(s.output.contains("early nofile=1024"), "the container's own process gets config.json's rlimits: \(s.output)")
        #expect(s.output.contains("three=7") && s.output.contains("got-usr1"), "ctr task kill -s SIGUSR1 reaches the process in the guest: \(s.output)")
        #expect(s.output.contains("exec-tty=/dev/pts/") && s.output.contains("exec-t=6"), "ctr task exec -t gets a terminal in the guest: \(s.output)")
        #expect(s.output.contains("run-tty=/dev/pts/") && s.output.contains("four=5"), "ctr run -t gets a terminal in the guest: \(s.output)")
        #expect(s.output.contains("size=30 90"), "the console's size reaches the guest's terminal: \(s.output)")
        for line in ["task-delete=0", "container-delete=0", "instances-left=0", "grants-left=0", "disks-left=0"] {
            #expect(s.output.contains(line), "\(line): \(s.output)")
        }
    }

    @Test func anImageTarballIsTheRootDiskOfADirectVM() throws {
        let s = try step("image")
        #expect(s.output.contains("direct: hi from /dev/vda\nstatus=0"), "\(s.output)")
    }

    @Test func twoCPUsWithoutADiskComeFromTheMADT() throws {
        let s = try step("madt")
        #expect(s.status == 3, "output: \(s.output.suffix(2000))")
        #expect(s.output.contains("cpus=2"), "the guest must see 2 CPUs: \(s.output.suffix(2000))")
        #expect(s.output.contains("Using ACPI (MADT) for SMP configuration"), "Linux must take its CPUs from the MADT: \(s.output.suffix(2000))")
    }

    @Test func directLinuxBootVmlinux() throws {
        let s = try step("vmlinux")
        #expect(s.status == 3, "output: \(s.output.suffix(2000))")
        #expect(s.output.contains("hello\n"))
    }
}

/// One rig session running each KVM step in sequence. Steps are framed on the output as
/// `@@step NAME@@` … `@@step-end NAME status=N@@`, so one stream carries them all.
enum RigKVMSession {
    struct Step: Sendable {
        var status: Int32
        var output: String
        /// The output of a first attempt whose guest triple-faulted, when the step ran twice.
        var firstAttempt: String? = nil
        /// How long the step took inside the rig, both attempts together.
        var seconds: Int? = nil
    }

    nonisolated(unsafe) static var rawOutput = ""
    /// Why the steps without a result did not run, when the session knows (its time ran out).
    nonisolated(unsafe) static var notRun: String?
    static let shared: Result<[String: Step], any Error> = Result(catching: { try run() })

    static func steps(mvm: String, vmlinux: String) -> [(String, [String])] {
        // The report goes to a file and only its KVM verdict to the console: the rig's serial
        // console has been seen to stall for minutes in the middle of a burst this size.
        [("doctor", ["sh", "-c", "\(ProcessRunner.shellQuote(mvm)) doctor --json --refresh >/tmp/doctor.json; s=$?; "
                     + "sed -n '/\"kvm\" : {/,/}/p' /tmp/doctor.json; exit $s"]),
         ("bzimage", [mvm, "run", "--mode", "direct", "--", "sh", "-c", "echo hello; exit 3"]),
         ("cpus2", [mvm, "run", "--mode", "direct", "--cpus", "2", "--", "sh", "-c", "nproc; echo hello; exit 3"]),
         ("vmlinux", [mvm, "run", "--mode", "direct", "--kernel", vmlinux,
                      "--initrd", (vmlinux as NSString).deletingLastPathComponent + "/initrd.img", "--", "sh", "-c", "echo hello; exit 3"]),
         // No disk: the machine is still described by ACPI, and Linux takes its CPUs from the
         // MADT (as a kernel built without CONFIG_X86_MPPARSE must), not from the MP table.
         ("madt", [mvm, "run", "--mode", "direct", "--cpus", "2", "--kernel", vmlinux,
                   "--initrd", (vmlinux as NSString).deletingLastPathComponent + "/initrd.img", "--", "sh", "-c",
                   "echo cpus=$(nproc); dmesg | grep -E 'MADT|MP-table|MPTABLE|SMP configuration'; exit 3"]),
         ("scratch-disk", ["truncate", "-s", "64M", scratchDisk]),
         // The guest's iperf3 client finds this one-shot server at the host end of its tap.
         ("iperf3-server", ["sh", "-c", "modprobe tun 2>/dev/null; iperf3 -s -1 -D -p \(iperfPort)"]),
         ("devices", [mvm, "run", "--mode", "direct", "--disk", scratchDisk, "--net", "tap", "--", "sh", "-c", devicesScript]),
         ("taps-left", ["sh", "-c", "ip -o link show | grep -c ' mvt' || true"]),
         ("vsock", ["sh", "-c", vsockScript(mvm: mvm)]),
         ("lifecycle", ["sh", "-c", lifecycleScript(mvm: mvm)]),
         ("kill-phases", ["sh", "-c", killPhasesScript(mvm: mvm)]),
         ("vmm-api", ["sh", "-c", vmmAPIScript(mvm: mvm, image: (vmlinux as NSString).deletingLastPathComponent)]),
         ("containerd", ["sh", "-c", containerdScript(mvm: mvm)]),
         // An image tarball as the root disk of a direct VM (ImageRunCLITests runs it hosted, on the host).
         ("image", ["sh", "-c", "echo \"direct: $(\(ProcessRunner.shellQuote(mvm)) run --mode direct --image \(busyboxImage) -- sh -c 'echo hi from $(mount | grep \" / \" | cut -d\" \" -f1)'; echo status=$?)\""]),
         ("balloon", ["sh", "-c", balloonScript(mvm: mvm)]),
         // Last: a nested QEMU is the step the emulated stack has hung in most.
         ("hosted-vcpus", ["sh", "-c", hostedVCPUsScript(mvm: mvm)])]
    }

    /// Step time limits above the 240 s default: about three times what a step takes here
    /// (every step here takes 81 s or less; a CI machine may be slower).
    static let limits = ["balloon": 300, "hosted-vcpus": 300]

    /// `mvm-vmm` driven through a whole Linux boot by plain HTTP over its socket, as Firecracker's
    /// clients drive Firecracker: machine-config, boot-source, a drive, InstanceStart, GET /,
    /// Paused, Resumed, then SendCtrlAltDel, which reboots Linux through the i8042 and ends the VMM.
    static func vmmAPIScript(mvm: String, image: String) -> String {
        let vmm = ProcessRunner.shellQuote((mvm as NSString).deletingLastPathComponent + "/mvm-vmm")
        // The keyboard's IRQ 1 comes from the DSDT's PS2K device through PNP (the VMM's default parameters).
        let report = "echo api-guest-up >/dev/ttyS0; grep -h Name= /proc/bus/input/devices >/dev/ttyS0; dmesg | grep -i -E 'i8042|atkbd|serio' >/dev/ttyS0; "
            + "cat /proc/sys/kernel/ctrl-alt-del >/dev/ttyS0; while :; do grep i8042 /proc/interrupts >/dev/ttyS0; sleep 3; done"
        let args = KernelCommandLine.build(command: ["sh", "-c", report],
                                           backend: "i8042.noaux i8042.nomux i8042.dumbkbd pci=off", rootfsReadOnly: true)
        let boot = #"{"kernel_image_path": "\#(image)/vmlinuz", "initrd_path": "\#(image)/initrd.img", "boot_args": "\#(args)"}"#
        let drive = #"{"drive_id": "rootfs", "path_on_host": "\#(image)/rootfs.ext4", "is_root_device": false, "is_read_only": true}"#
        return """
        sock=/tmp/vmm-api.sock; log=/tmp/vmm-api.console
        \(vmm) --api-sock $sock --id rigapi --console-log $log >/tmp/vmm-api.out 2>&1 &
        v=$!
        api() {
            printf '%s %s HTTP/1.1\\r\\nHost: localhost\\r\\nContent-Type: application/json\\r\\nContent-Length: %s\\r\\nConnection: close\\r\\n\\r\\n%s' \\
                "$1" "$2" "$(printf %s "$3" | wc -c)" "$3" | socat -t 10 - UNIX-CONNECT:$sock | tr -d '\\r'
        }
        for i in $(seq 1 100); do [ -S $sock ] && break; sleep 0.1; done
        echo "machine-config=$(api PUT /machine-config '{"vcpu_count": 2, "mem_size_mib": 512}' | head -1)"
        echo "boot-source=$(api PUT /boot-source \(ProcessRunner.shellQuote(boot)) | head -1)"
        echo "drive=$(api PUT /drives/rootfs \(ProcessRunner.shellQuote(drive)) | head -1)"
        echo "start=$(api PUT /actions '{"action_type": "InstanceStart"}' | head -1)"
        for i in $(seq 1 400); do grep -q api-guest-up $log 2>/dev/null && break; sleep 1; done
        echo "guest-up=$(grep -c api-guest-up $log)"
        echo "state-running=$(api GET / '' | grep -c '"Running"')"
        echo "pause=$(api PATCH /vm '{"state": "Paused"}' | head -1)"
        echo "state-paused=$(api GET / '' | grep -c '"Paused"')"
        echo "resume=$(api PATCH /vm '{"state": "Resumed"}' | head -1)"
        # Up to three presses, 20 s apart, as a client would retry: one was seen to go unanswered.
        for press in 1 2 3; do
            echo "cad=$(api PUT /actions '{"action_type": "SendCtrlAltDel"}' | head -1)"
            for i in $(seq 1 20); do kill -0 $v 2>/dev/null || break; sleep 1; done
            kill -0 $v 2>/dev/null || { echo "cad-presses=$press"; break; }
        done
        if kill -0 $v 2>/dev/null; then echo cad-timeout; kill $v; fi
        wait $v; echo "vmm-status=$?"
        grep -v '^@@' $log | tail -30; cat /tmp/vmm-api.out
        """
    }

    /// A direct VM seen from its host while it runs: `mvm ps` lists it, its cgroup holds the
    /// slice (one CPU of work, guest RAM plus the VMM's 64 MiB), `mvm logs` reads its console,
    /// `mvm stop` ends it, and nothing is left: no cgroup, no grant.
    static func lifecycleScript(mvm: String) -> String {
        let m = ProcessRunner.shellQuote(mvm)
        return """
        \(m) run --mode direct --name rigps --cpus 1 --memory 256M --timeout 280 -- sh -c 'sleep 200' >/tmp/ps-run.out 2>&1 &
        vm=$!
        for i in $(seq 1 150); do \(m) logs rigps 2>/dev/null | grep -q boot-complete && break; sleep 1; done
        \(m) ps | grep rigps
        echo "cpu.max=$(cat /sys/fs/cgroup/microvm/direct-rigps/cpu.max)"
        echo "memory.max=$(cat /sys/fs/cgroup/microvm/direct-rigps/memory.max)"
        echo "logs-boot=$(\(m) logs rigps | grep -c boot-complete)"
        \(m) stop rigps; echo "stop=$?"
        wait $vm; echo "run-status=$?"
        grep -o 'Ctrl-Alt-Del sent; the guest reset' /tmp/ps-run.out
        test -d /sys/fs/cgroup/microvm/direct-rigps && echo cgroup-left || echo cgroup-gone
        echo "grants-left=$(\(m) alloc show | grep -c rigps)"
        tail -3 /tmp/ps-run.out
        """
    }

    /// `mvm run --mode direct --net tap` of Linux killed with SIGKILL after its grant, once its
    /// VMM runs (Linux booting) and once the guest is up: each time `mvm gc` leaves no instance,
    /// grant, tap, cgroup or VMM. While it runs, the VMM is jailed: pid 1 of its namespace, no
    /// capabilities, seccomp on.
    static func killPhasesScript(mvm: String) -> String {
        let m = ProcessRunner.shellQuote(mvm)
        return """
        modprobe tun 2>/dev/null
        for phase in granted spawned running; do
            name=rigk$phase
            if [ $phase = running ]; then
                \(m) run --mode direct --net tap --name $name --timeout 280 -- sleep 200 >/tmp/k-$phase.out 2>&1 &
                pid=$!
                for i in $(seq 1 150); do \(m) logs $name 2>/dev/null | grep -q boot-complete && break; sleep 1; done
                vmm=$(\(m) ps | awk -v n=$name '$1 == n {print $6}')
                [ -n "$vmm" ] || { echo "no VMM for $name:"; \(m) ps; tail -5 /tmp/k-$phase.out; }
                echo "jail-$phase: $(grep -E '^(NSpid|CapEff|NoNewPrivs|Seccomp):' /proc/$vmm/status | tr '\\t\\n' '  ')"
            else
                MVM_STOP_AT=$phase \(m) run --mode direct --net tap --name $name --timeout 280 -- sleep 200 >/tmp/k-$phase.out 2>&1 &
                pid=$!
                for i in $(seq 1 100); do [ "$(awk '{print $3}' /proc/$pid/stat 2>/dev/null)" = T ] && break; sleep 0.2; done
                echo "state-$phase=$(awk '{print $3}' /proc/$pid/stat)"
            fi
            kill -9 $pid; wait $pid 2>/dev/null
            sleep 1
            \(m) gc >/dev/null
            echo "left-$phase: ps=$(\(m) ps | grep -c $name) grants=$(\(m) alloc show | grep -c $name) taps=$(ip -o link show | grep -c ' mvt') cgroups=$(ls -d /sys/fs/cgroup/microvm/*$name* 2>/dev/null | wc -l) vmm=$(pgrep -fc -- "--id $name")"
        done
        """
    }

    /// A direct Linux VM of 512 MiB with a balloon: 256 MiB written to its tmpfs and removed
    /// comes back to the host through free page reporting (the VMM's RSS before, full and
    /// after, in KiB); `mvm update --memory 256M` fills the balloon and the guest's available
    /// memory falls by as much, `--memory 512M` gives it back.
    /// A hosted VM (QEMU on nested KVM) booted with one vCPU and room for two: `mvm update
    /// --cpus` plugs the second in, takes it out and plugs it in again; the guest prints the CPUs
    /// it has online every second. Then `mvm exec` runs a command in it over vsock.
    static func hostedVCPUsScript(mvm: String) -> String {
        let m = ProcessRunner.shellQuote(mvm)
        return """
        modprobe vhost_vsock 2>/dev/null
        \(m) run -d --mode hosted --name righp --cpus 1 --max-cpus 2 --memory 256M --vsock 44 --vsock-shell --timeout 400 -- sh -c 'while :; do echo "online=$(cat /sys/devices/system/cpu/online)" >/dev/ttyS0; sleep 1; done' >/tmp/hp-run.out 2>&1
        online() { sleep 3; \(m) logs righp | grep -a '^online=' | tail -1 | tr -d '\\r'; }
        for i in $(seq 1 150); do \(m) logs righp 2>/dev/null | grep -q '^online=' && break; sleep 1; done
        echo "boot-$(online)"
        \(m) update righp --cpus 2 2>&1; echo "grow=$?"; echo "grown-$(online)"
        \(m) update righp --cpus 1 2>&1; echo "shrink=$?"; echo "shrunk-$(online)"
        \(m) update righp --cpus 2 2>&1; echo "regrow=$?"; echo "regrown-$(online)"
        # mvm exec through the guest init's vsock shell, on the vhost-vsock device libvirt gave the domain.
        \(m) exec righp -- sh -c 'echo hosted-exec-ran-on-$(nproc)-cpus; exit 4'; echo "exec-status=$?"
        \(m) stop righp >/dev/null; echo "stop=$?"
        echo "grants-left=$(\(m) alloc show | grep -c righp)"
        echo "run's end:"; tail -5 /tmp/hp-run.out
        """
    }

    /// containerd's runc shim drives mvm-runtime inside the rig, where the VM is the direct VMM
    /// on nested KVM: a busybox image imported from a docker save tarball runs, its output and
    /// status come back; `ctr task exec` runs two processes in a second one through the guest
    /// agent (output, stderr, stdin, status); `ctr task kill` stops it; a third's output streams
    /// while it runs and a signal reaches its process; the deletes leave nothing.
    static func containerdScript(mvm: String) -> String {
        let m = ProcessRunner.shellQuote(mvm)
        return """
        modprobe vhost_vsock 2>/dev/null
        d=/tmp/ctrd; mkdir -p $d; ln -sf \(m) $d/mvm-runtime
        printf 'version = 2\\nroot = "%s/root"\\nstate = "%s/state"\\n[grpc]\\n  address = "%s/sock"\\n' $d $d $d > $d/config.toml
        containerd --config $d/config.toml >$d/log 2>&1 &
        daemon=$!
        c="ctr -a $d/sock"
        for i in $(seq 1 60); do $c version >/dev/null 2>&1 && break; sleep 0.5; done
        # The rig's kernel has no overlayfs: containerd's native snapshotter copies instead.
        $c image import --snapshotter native \(busyboxImage) >/dev/null && echo imported
        $c run --snapshotter native --rm --runc-binary $d/mvm-runtime docker.io/library/busybox:latest one sh -c 'echo hi from $(uname -r); exit 3' </dev/null; echo "run=$?"
        $c run --snapshotter native -d --runc-binary $d/mvm-runtime docker.io/library/busybox:latest two sleep 600 </dev/null
        for i in $(seq 1 120); do \(m) ps | grep -q 'ctr-two .*running' && break; sleep 1; done
        \(m) ps | grep ctr-two
        # Processes run beside the container's own through the guest agent, with their own stdio and status.
        $c task exec --exec-id e1 two sh -c 'echo exec-out $(cat /proc/1/comm); echo exec-err >&2; exit 4' </dev/null; echo "exec=$?"
        printf 'through-stdin\n' | $c task exec --exec-id e2 two cat; echo "exec-stdin=$?"
        # process.user and process.rlimits (containerd's default: 1024 open files) reach the process.
        $c task exec --exec-id e4 --user 65534 two sh -c 'echo exec-user=$(id -u) exec-nofile=$(ulimit -Hn)'
        # A terminal for an exec'd process (script gives ctr the terminal it wants).
        script -qec "$c task exec -t --exec-id e3 two sh -c 'echo exec-tty=\\$(tty); exit 6'" /dev/null </dev/null >$d/e3.out 2>&1; echo "exec-t=$?"; tr -d '\\r' < $d/e3.out
        $c task kill two; for i in $(seq 1 60); do $c task ls | grep -q STOPPED && break; sleep 1; done
        # The process's output streams while it runs, and a signal ctr sends reaches it in the guest.
        $c run --snapshotter native --rm --runc-binary $d/mvm-runtime docker.io/library/busybox:latest three \
            sh -c 'trap "echo got-usr1; exit 7" USR1; echo early nofile=$(ulimit -Hn); while :; do sleep 1; done' </dev/null >$d/three.out 2>&1 &
        three=$!
        for i in $(seq 1 120); do grep -q early $d/three.out && break; sleep 1; done
        echo "streamed=$(grep -c early $d/three.out) while $($c task ls | awk '$1 == "three" {print $3}')"
        $c task kill -s SIGUSR1 three
        wait $three; echo "three=$?"; cat $d/three.out
        # process.terminal: the container's process gets a terminal in the guest, its master at ctr's console socket.
        # ctr gives the console its own terminal's size (30x90 here), which reaches the guest's terminal.
        script -qec "stty rows 30 cols 90; $c run --snapshotter native --rm -t --runc-binary $d/mvm-runtime docker.io/library/busybox:latest four sh -c 'sleep 2; echo run-tty=\\$(tty) size=\\$(stty size); exit 5'" /dev/null </dev/null >$d/four.out 2>&1
        echo "four=$?"; tr -d '\\r' < $d/four.out
        $c task ls | grep two
        $c task delete two >/dev/null; echo "task-delete=$?"; $c container delete two; echo "container-delete=$?"
        echo "instances-left=$(\(m) ps | grep -c ctr-)"; echo "grants-left=$(\(m) alloc show | grep -c ctr-)"
        echo "disks-left=$(ls /run/mvm-state/runtime-disks 2>/dev/null | wc -l)"
        # The bracket keeps the pattern from matching this script's own shell (and the session's).
        kill $daemon; sleep 1; pkill -f "[c]ontainerd-shim-runc-v2 .*-address $d/sock"; wait
        """
    }

    static func balloonScript(mvm: String) -> String {
        let m = ProcessRunner.shellQuote(mvm)
        return """
        modprobe vhost_vsock 2>/dev/null
        \(m) run -d --mode direct --name rigb --memory 512M --balloon --vsock 43 --vsock-shell --timeout 400 -- sleep 380 >/tmp/b-run.out 2>&1
        for i in $(seq 1 150); do \(m) logs rigb 2>/dev/null | grep -q boot-complete && break; sleep 1; done
        for i in $(seq 1 60); do \(m) exec rigb -- true >/dev/null 2>&1 && break; sleep 1; done
        vmm=$(\(m) ps | awk '$1 == "rigb" {print $6}')
        rss() { awk '/^VmRSS/ {print $2}' /proc/$vmm/status; }
        avail() { \(m) exec rigb -- awk '/^MemAvailable/ {print $2}' /proc/meminfo; }
        echo "balloon-driver=$(\(m) exec rigb -- sh -c 'for d in /sys/bus/virtio/devices/*/driver; do readlink $d; done | grep -c virtio_balloon')"
        echo "rss-idle=$(rss)"
        # A tmpfs of its own: the guest's /tmp holds only half its memory.
        \(m) exec rigb -- sh -c 'mkdir -p /tmp/b && mount -t tmpfs -o size=300m tmpfs /tmp/b && head -c 268435456 /dev/zero >/tmp/b/fill && echo filled'
        full=$(rss); echo "rss-full=$full"
        \(m) exec rigb -- sh -c 'rm /tmp/b/fill; umount /tmp/b'
        for i in $(seq 1 30); do sleep 1; [ $(( full - $(rss) )) -ge 204800 ] && break; done
        echo "rss-freed=$(rss) after ${i} s"
        \(m) stats rigb | grep -E '^mvm_vmm_balloon_(reported|discarded)_bytes_total'
        echo "avail-before=$(avail)"
        \(m) update rigb --memory 256M; echo "shrink=$?"
        echo "avail-shrunk=$(avail)"
        \(m) stats rigb | grep -E '^mvm_vmm_balloon_actual_bytes'
        \(m) ps | grep rigb
        \(m) update rigb --memory 512M; echo "grow=$?"
        sleep 3
        echo "avail-grown=$(avail)"
        \(m) stop rigb >/dev/null; echo "stop=$?"
        echo "grants-left=$(\(m) alloc show | grep -c rigb)"
        tail -3 /tmp/b-run.out
        """
    }

    /// A guest waits in `sleep`; the host reaches the guest agent through vhost-vsock (CID 42,
    /// port 1024) with `mvm exec`, runs two commands there and ends the sleep, so the run ends
    /// early with the command's status 9 instead of running out its time.
    static func vsockScript(mvm: String) -> String {
        """
        modprobe vhost_vsock 2>/dev/null
        \(ProcessRunner.shellQuote(mvm)) run --mode direct --name rigvs --vsock 42 --vsock-shell --timeout 280 -- sh -c 'sleep 240; exit 9' >/tmp/vsock-run.out 2>&1 &
        vm=$!
        out=
        for i in $(seq 1 200); do
            out=$(\(ProcessRunner.shellQuote(mvm)) exec rigvs -- sh -c 'uname -r; echo vsock-ok' 2>&1)
            case "$out" in *vsock-ok*) break ;; esac
            sleep 1
        done
        printf '%s\n' "$out"
        # What one mvm exec costs, whole command, interleaved with mvm --help (the same binary
        # starting, nothing else): their difference is the lookup and the agent's round trip
        # (nested KVM on an emulated host).
        floor_ns=0; exec_ns=0
        for i in 1 2 3 4 5; do
            a=$(date +%s%N); \(ProcessRunner.shellQuote(mvm)) --help >/dev/null; b=$(date +%s%N); \(ProcessRunner.shellQuote(mvm)) exec rigvs -- true; c=$(date +%s%N)
            floor_ns=$((floor_ns + b - a)); exec_ns=$((exec_ns + c - b))
        done
        echo "exec-ms=$((exec_ns / 5000000)) start-ms=$((floor_ns / 5000000))"
        # A process that ignores the signals: the first TERM goes to it, the second ends mvm exec's wait.
        \(ProcessRunner.shellQuote(mvm)) exec rigvs -- sh -c 'trap "" INT TERM; echo ignoring; sleep 100' >/tmp/giveup.out 2>&1 &
        waiter=$!
        for i in $(seq 1 50); do grep -q ignoring /tmp/giveup.out && break; sleep 0.2; done
        kill -TERM $waiter; sleep 1; kill -TERM $waiter
        wait $waiter; echo "giveup-status=$?"; cat /tmp/giveup.out
        \(ProcessRunner.shellQuote(mvm)) exec rigvs -- sh -c 'echo exec-ran-in-$(hostname); echo to-stderr >&2; exit 5'
        echo "exec-status=$?"
        \(ProcessRunner.shellQuote(mvm)) exec rigvs -- killall sleep >/dev/null 2>&1
        wait $vm
        echo "vm-status=$?"
        tail -5 /tmp/vsock-run.out
        """
    }

    static let iperfPort = 5299

    /// A busybox image tarball in the cache, which the rig sees (read-only).
    static var busyboxImage: String { Paths.default.cache + "/rig-busybox.tar" }

    /// Inside the rig /tmp is a fresh tmpfs: a writable home for the second disk.
    static let scratchDisk = "/tmp/mvm-rig-scratch.img"

    /// Runs in the guest on the image's rootfs (over virtio-blk): entropy from virtio-rng, a
    /// verified random write and a random read with O_DIRECT on the second virtio disk.
    static let devicesScript = """
        mount | grep ' on / '; echo "rng=$(cat /sys/class/misc/hw_random/rng_current)"; \
        echo "rngbytes=$(head -c 64 /dev/hwrng | wc -c)"; \
        fio --name=verify --filename=/dev/vdb --direct=1 --rw=randwrite --bs=4k --size=8M --verify=crc32c --verify_state_save=0 \
            --ioengine=psync --output-format=terse >/dev/null && echo fio-verify-ok; \
        echo "randread-iops=$(fio --name=rr --filename=/dev/vdb --direct=1 --rw=randread --bs=4k --size=8M --runtime=3 \
            --time_based --ioengine=psync --output-format=terse --terse-version=3 | cut -d';' -f8)"; \
        echo "eth0=$(basename "$(readlink /sys/class/net/eth0/device/driver)")"; \
        echo "mergeable-rx=$(cut -c16 /sys/class/net/eth0/device/features)"; \
        ping -c 2 -W 5 "$MVM_HOST" >/dev/null && echo ping-ok; \
        iperf3 -c "$MVM_HOST" -p \(iperfPort) -t 2 -f m --bidir | grep receiver; exit 3
        """

    /// Each step runs under a time limit of its own, so a step that hangs costs that step (its
    /// output then ends with the processes still running, and where each waits), not the session.
    /// A step runs once more, after a `@@step-retry` line, when its Linux guest triple-faulted
    /// or it ran past its limit, and the session's `deadline` (seconds from the script's start)
    /// leaves room: the nested KVM here runs on an emulated AMD-V CPU, under which one boot in
    /// some hundreds has died so with nothing on its console, and nested guests have been seen
    /// to hang. What a first attempt left behind is collected (`cleanup`) before the second.
    /// Both attempts stay in the output (`Step.firstAttempt`).
    static func script(_ steps: [(String, [String])], limits: [String: Int] = [:], defaultLimit: Int = 240,
                       deadline: Int = 1400, cleanup: [String]? = nil) -> String {
        var s = "exec 2>&1\nend=$(( $(date +%s) + \(deadline) ))\n"
        for (name, argv) in steps {
            let limit = limits[name] ?? defaultLimit
            let run = "timeout -k 10 \(limit) " + argv.map(ProcessRunner.shellQuote).joined(separator: " ") + "; s=$?\n"
                + "[ $s = 124 ] || [ $s = 137 ] && { echo \"step \(name) ran past \(limit) s; still running:\"; ps -eo pid,ppid,stat,wchan:24,etime,args | grep -v ' \\[' | tail -40; }\n"
            s += "echo '@@step \(name)@@'; t0=$(date +%s)\n" + run
            // The output so far is the rig's output file, which the host follows: this step's part of it.
            let tripleFault = "tail -c 1000000 \"$MVM_RIG_SCRATCH/output\" | sed -n '/^@@step \(name)@@$/,$p' | grep -q 'guest triple-faulted'"
            let ranPast = "{ [ $s = 124 ] || [ $s = 137 ]; } && [ $(( $(date +%s) + \(limit) )) -lt $end ]"
            let collect = cleanup.map { $0.map(ProcessRunner.shellQuote).joined(separator: " ") + " >/dev/null 2>&1; " } ?? ""
            s += "if \(tripleFault) || \(ranPast); then echo; echo '@@step-retry \(name)@@'; \(collect)\n\(run)fi\n"
            s += "echo; echo \"@@step-end \(name) status=$s secs=$(( $(date +%s) - t0 ))@@\"\n"
        }
        return s
    }

    static func parse(_ text: String) -> [String: Step] {
        var out: [String: Step] = [:]
        var current: String?
        var body: [Substring] = []
        var firstAttempt: String?
        func joined() -> String {
            // The newline echoed before a marker belongs to the frame.
            if body.last == "" { body.removeLast() }
            return body.joined(separator: "\n") + (body.isEmpty ? "" : "\n")
        }
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix("@@step "), line.hasSuffix("@@") {
                current = String(line.dropFirst(7).dropLast(2)); body = []; firstAttempt = nil
            } else if line.hasPrefix("@@step-retry "), line.hasSuffix("@@"), current != nil {
                firstAttempt = joined(); body = []
            } else if line.hasPrefix("@@step-end "), line.hasSuffix("@@"), let name = current {
                let fields = line.dropFirst(11).dropLast(2).split(separator: " ")
                func field(_ key: String) -> Int32? { fields.first { $0.hasPrefix(key + "=") }.flatMap { Int32($0.dropFirst(key.count + 1)) } }
                out[name] = Step(status: field("status") ?? -1, output: joined(), firstAttempt: firstAttempt, seconds: field("secs").map(Int.init))
                current = nil
            } else if current != nil {
                body.append(line)
            }
        }
        return out
    }

    /// Steps that only mean something in one rig: a restarted rig reruns them all if one remains
    /// (the scratch disk and iperf3 server live in the rig's /tmp; taps-left checks after devices).
    static let together: [Set<String>] = [["scratch-disk", "iperf3-server", "devices", "taps-left"]]

    /// The steps of a rig cut off by its time limit: those that ended, and the one it was in,
    /// failed (status -1) with its output so far and `why`.
    static func settle(cut text: String, why: String) -> [String: Step] {
        var out = parse(text)
        if let step = inProgress(text) {
            let partial = parse(text + "\n@@step-end \(step) status=-1@@\n")[step]
            out[step] = Step(status: -1, output: (partial?.output ?? "") + "(\(why))\n", firstAttempt: partial?.firstAttempt)
        }
        return out
    }

    /// How long each finished step took, in the session's order: "doctor 12 s, bzimage 31 s, …".
    static func timings(_ results: [String: Step], order: [String]) -> String {
        "step times: " + order.compactMap { name in results[name].map { "\(name) \($0.seconds.map { "\($0) s" } ?? "?")" } }.joined(separator: ", ")
    }

    /// The step a stalled rig was in: the last one started and not ended.
    static func inProgress(_ text: String) -> String? {
        var current: String?
        for line in text.split(separator: "\n") {
            if line.hasPrefix("@@step-end ") { current = nil }
            else if line.hasPrefix("@@step "), line.hasSuffix("@@") { current = String(line.dropFirst(7).dropLast(2)) }
        }
        return current
    }

    /// What a fresh rig runs after a stall: every chosen step without a result, with the rest
    /// of its `together` group, in the original order; never a step given up on.
    static func remaining(_ chosen: [String], done: Set<String>, givenUp: Set<String> = []) -> [String] {
        var rerun = Set(chosen.filter { !done.contains($0) })
        for group in together where !group.isDisjoint(with: rerun) { rerun.formUnion(group) }
        return chosen.filter { rerun.contains($0) && !givenUp.contains($0) }
    }

    static func run() throws -> [String: Step] {
        // The guest image must exist before the rig starts: inside, the cache is read-only.
        let image = try ImageStore().ensureDefault()
        // So is the container image's root disk: made here, found by its content inside.
        try BusyboxImage.make(at: busyboxImage)
        _ = try ContainerImageStore().prepare(tarball: busyboxImage, disk: true)
        let started = Date()
        // MVM_RIG_STEPS=a,b runs only those steps (to iterate on one; the others then fail as not run).
        let only = ProcessInfo.processInfo.environment["MVM_RIG_STEPS"].map { Set($0.split(separator: ",").map(String.init)) }
        let mvm = try MvmBinary.find()
        let chosen = steps(mvm: mvm, vmlinux: image.vmlinux).filter { only?.contains($0.0) ?? true }
        let argv = Dictionary(uniqueKeysWithValues: chosen)
        // A rig that is lost, stalled (its kernel silent past the watchdog) or ended (its kernel
        // died), as nested SVM under TCG has been seen to do both, is replaced by a fresh one for
        // the steps left. A step in which two rigs are lost fails with what both said; so does
        // the session after three.
        var results: [String: Step] = [:]
        var losses: [String: [String]] = [:]
        var todo = chosen.map(\.0)
        var restarts = 0
        // Within the suite's 40 minutes, whatever the restarts. The session takes 5 to 7 minutes
        // here; the room is for a machine several times slower, and for steps run twice.
        let budget = started.addingTimeInterval(2300)
        while !todo.isEmpty {
            var o = RigGate.options(timeout: min(2100, budget.timeIntervalSinceNow))
            o.memoryMiB = 3072
            // Every step prints within its limit (at most 300 s, then "ran past"): a rig whose
            // kernel beats but whose steps say nothing for longer is stuck (seen: a step's output
            // stopped mid-line for good, its own time limit never firing), and is replaced.
            o.outputTimeout = Double((limits.values.max() ?? 240) + 120)
            // Retries must end before the rig's own limit, less its boot.
            let deadline = Int(o.timeout) - 60
            do {
                let r = try KVMTestRunner.run(command: ["sh", "-c", script(todo.map { ($0, argv[$0]!) }, limits: limits,
                                                                           deadline: deadline, cleanup: [mvm, "gc"])],
                                              options: o, streamOutput: { FileHandle.standardOutput.write($0) })
                rawOutput += r.outputText
                results.merge(parse(r.outputText)) { $1 }
                print("rig KVM session: rig boot \(Int(r.bootSeconds)) s, longest silence \(Int(r.longestSilence)) s, wall \(Int(Date().timeIntervalSince(started))) s, status \(r.status), restarts \(restarts); \(timings(results, order: chosen.map(\.0)))")
                break
            } catch let cut as RigTimedOut {
                // The rig was alive but slow: what finished counts, the step it was in fails with
                // its output so far, and the steps after it did not run. No time is left for another.
                rawOutput += cut.outputText
                let why = "\(cut) after \(Int(Date().timeIntervalSince(started))) s of the session"
                results.merge(settle(cut: cut.outputText, why: why)) { $1 }
                notRun = "\(why); \(timings(results, order: chosen.map(\.0)))"
                print("rig KVM session: \(notRun!)")
                break
            } catch let lost as any RigLost {
                rawOutput += lost.outputText
                results.merge(parse(lost.outputText)) { $1 }
                let step = inProgress(lost.outputText) ?? "(between steps)"
                print("rig KVM session: the rig was lost in step \(step) after \(Int(Date().timeIntervalSince(started))) s: \(lost); \(timings(results, order: chosen.map(\.0)))")
                losses[step, default: []].append(lost.description)
                if losses[step]!.count >= 2 {
                    results[step] = Step(status: -1, output: "two rigs were lost in this step:\n" + losses[step]!.joined(separator: "\n"))
                }
                restarts += 1
                guard restarts < 3, budget.timeIntervalSinceNow > 300 else { throw lost }
                todo = remaining(chosen.map(\.0), done: Set(results.keys), givenUp: Set(losses.filter { $0.value.count >= 2 }.keys))
            }
        }
        return results
    }
}

@Suite struct RigKVMSessionParseTests {
    @Test func framedStepsParseWithStatusAndOutput() {
        let text = "boot noise\n@@step a@@\nhello\n\n@@step-end a status=3 secs=41@@\n@@step b@@\n\n@@step-end b status=0@@\n@@step c@@\npartial"
        let steps = RigKVMSession.parse(text)
        #expect(steps["a"]?.status == 3)
        #expect(steps["a"]?.output == "hello\n")
        #expect(steps["a"]?.seconds == 41)
        #expect(steps["b"]?.status == 0)
        #expect(steps["b"]?.seconds == nil)
        #expect(steps["b"]?.output == "")
        #expect(steps["c"] == nil, "a step without its end marker did not finish")
    }

    @Test func theStepInProgressIsTheLastOneStartedAndNotEnded() {
        #expect(RigKVMSession.inProgress("@@step a@@\nx\n@@step-end a status=0@@\n@@step b@@\npartial") == "b")
        #expect(RigKVMSession.inProgress("@@step a@@\n@@step-end a status=0@@\n") == nil)
        #expect(RigKVMSession.inProgress("boot noise") == nil)
    }

    @Test func aFreshRigRunsWhatIsLeftWithItsGroup() {
        let all = ["doctor", "scratch-disk", "iperf3-server", "devices", "taps-left", "vsock", "madt"]
        #expect(RigKVMSession.remaining(all, done: ["doctor"]) == Array(all.dropFirst()))
        // taps-left only means something right after devices, in the same rig.
        #expect(RigKVMSession.remaining(all, done: ["doctor", "scratch-disk", "iperf3-server", "devices"])
                == ["scratch-disk", "iperf3-server", "devices", "taps-left", "vsock", "madt"])
        #expect(RigKVMSession.remaining(all, done: Set(all).subtracting(["madt"])) == ["madt"])
        #expect(RigKVMSession.remaining(all, done: ["doctor"], givenUp: ["devices"])
                == ["scratch-disk", "iperf3-server", "taps-left", "vsock", "madt"])
        #expect(RigKVMSession.remaining(all, done: Set(all)).isEmpty)
    }

    @Test func aRigCutOffByItsTimeKeepsWhatFinished() {
        let text = "@@step a@@\nfine\n\n@@step-end a status=0 secs=9@@\n@@step b@@\nhalf of b\n"
        let steps = RigKVMSession.settle(cut: text, why: "out of time")
        #expect(steps["a"]?.status == 0 && steps["a"]?.output == "fine\n")
        #expect(steps["b"]?.status == -1 && steps["b"]?.output == "half of b\n(out of time)\n")
        #expect(steps.count == 2)
        #expect(RigKVMSession.timings(steps, order: ["a", "b", "c"]) == "step times: a 9 s, b ?")
    }

    @Test func aRetriedStepKeepsBothAttempts() {
        let text = "@@step a@@\nmvm: error: guest triple-faulted\n\n@@step-retry a@@\nhello\n\n@@step-end a status=3@@\n@@step b@@\nok\n\n@@step-end b status=0@@\n"
        let steps = RigKVMSession.parse(text)
        #expect(steps["a"]?.status == 3 && steps["a"]?.output == "hello\n")
        #expect(steps["a"]?.firstAttempt == "mvm: error: guest triple-faulted\n")
        #expect(steps["b"]?.output == "ok\n" && steps["b"]?.firstAttempt == nil)
        #expect(RigKVMSession.inProgress(text) == nil)
    }

    /// The session's script itself, run here by sh: a step past its limit runs once more (what
    /// the first left collected first) while the deadline leaves room for it, and not after.
    @Test func aStepPastItsLimitRunsOnceMoreWhileTimeIsLeft() throws {
        let dir = NSTemporaryDirectory() + "rig-script-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        FileManager.default.createFile(atPath: dir + "/output", contents: nil)
        let env = ["MVM_RIG_SCRATCH": dir, "PATH": "/usr/bin:/bin"]
        let steps: [(String, [String])] = [("slow", ["sleep", "30"]), ("quick", ["sh", "-c", "echo ok"])]
        let roomy = try ProcessRunner.run(["sh", "-c", RigKVMSession.script(steps, limits: ["slow": 1], deadline: 100, cleanup: ["touch", dir + "/collected"])],
                                          environment: env, timeout: 60)
        var parsed = RigKVMSession.parse(roomy.stdoutText)
        #expect(parsed["slow"]?.status == 124, "\(roomy.stdoutText)")
        #expect(parsed["slow"]?.firstAttempt?.contains("step slow ran past 1 s") == true, "\(roomy.stdoutText)")
        #expect(parsed["slow"]?.output.contains("step slow ran past 1 s") == true)
        #expect(FileManager.default.fileExists(atPath: dir + "/collected"))
        #expect(parsed["quick"]?.status == 0 && parsed["quick"]?.output == "ok\n" && parsed["quick"]?.firstAttempt == nil)

        let tight = try ProcessRunner.run(["sh", "-c", RigKVMSession.script(steps, limits: ["slow": 1], deadline: 1)], environment: env, timeout: 60)
        parsed = RigKVMSession.parse(tight.stdoutText)
        #expect(parsed["slow"]?.status == 124 && parsed["slow"]?.firstAttempt == nil, "no time for a second attempt: \(tight.stdoutText)")
        #expect(parsed["quick"]?.status == 0)
    }

    @Test func scriptQuotesEveryArgument() {
        let s = RigKVMSession.script([("x", ["/bin/echo", "a b", "it's"])])
        #expect(s.contains("'/bin/echo' 'a b' 'it'\\''s'"))
        #expect(s.contains("@@step-end x status=$s secs="))
    }
}

final class ChunkBox: @unchecked Sendable {
    private let lock = NSLock()
    private var chunks: [Data] = []
    func append(_ d: Data) { lock.lock(); chunks.append(d); lock.unlock() }
    var count: Int { lock.lock(); defer { lock.unlock() }; return chunks.count }
    func joined() -> Data { lock.lock(); defer { lock.unlock() }; return chunks.reduce(Data(), +) }
}
