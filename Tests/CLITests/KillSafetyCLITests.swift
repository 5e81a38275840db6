import Foundation
import Testing
import MicroVM

/// `mvm` killed with SIGKILL while its instance runs: the grant follows the process that holds
/// the resources, so nothing is granted twice, and `mvm gc` removes what was left.
@Suite("Kill safety from the command line", .serialized, .timeLimit(.minutes(3)))
struct KillSafetyCLITests {
    static let canRunContainers = getuid() == 0 && ProcessRunner.which("runc") != nil

    /// A state directory of the test's own (ledger, records): `MVM_STATE_DIR` and its path.
    static func stateDirectory() throws -> (env: [String: String], dir: String) {
        let dir = "/tmp/mvm-kill-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return (["MVM_STATE_DIR": dir + "/state"], dir)
    }

    /// Removes a directory from `stateDirectory()` once no process works in it any more: a
    /// detached run may still be tidying its state (libvirt's embedded driver writes under it
    /// as it closes) after `mvm stop` returned, and would recreate what was removed.
    static func removeStateDirectory(_ dir: String, waiting seconds: Double = 30) {
        let needle = Array("MVM_STATE_DIR=\(dir)/state\0".utf8)
        func users() -> Bool {
            let pids = (try? FileManager.default.contentsOfDirectory(atPath: "/proc"))?.filter { Int32($0) != nil } ?? []
            return pids.contains { pid in
                guard Int32(pid) != getpid(), let env = FileManager.default.contents(atPath: "/proc/\(pid)/environ") else { return false }
                return Array(env).firstRange(of: needle) != nil
            }
        }
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline, users() { usleep(100_000) }
        try? FileManager.default.removeItem(atPath: dir)
    }

    /// Polls `body` until it is true or `seconds` pass.
    func eventually(_ seconds: Double, _ body: () throws -> Bool) rethrows -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if try body() { return true }
            usleep(100_000)
        }
        return try body()
    }

    @Test(.enabled(if: canRunContainers, "needs root and runc"))
    func aKilledRunsGrantFollowsItsContainerUntilGCRemovesIt() throws {
        let (env, dir) = try Self.stateDirectory()
        defer { KillSafetyCLITests.removeStateDirectory(dir) }
        func mvm(_ args: String...) throws -> ProcessRunner.Output { try MVM.run(args, environment: env, timeout: 120) }
        let name = "kill-\(UUID().uuidString.prefix(6).lowercased())"

        // posix_spawn and waitpid: the run's exit is seen at once, whatever its children hold.
        let run = try ChildProcess([try #require(MVM.binary), "run", "--mode", "container", "--name", name, "--memory", "256M",
                                    "--timeout", "120", "--", "sleep", "300"], environment: env)
        defer { run.signal(SIGKILL); _ = run.wait(timeout: 10) }
        let held = try eventually(60) { try mvm("alloc", "show").stdoutText.contains("held by runc container init") }
        let shown = try mvm("alloc", "show").stdoutText
        #expect(held, "the grant must name the container's init as its holder: \(shown)")

        // mvm dies at once; the container goes on holding its memory and CPU.
        run.signal(SIGKILL)
        #expect(!run.wait(timeout: 10).timedOut, "mvm must end at once on SIGKILL")
        let show = try mvm("alloc", "show").stdoutText
        #expect(show.contains(name) && show.contains("grants      1"), "the grant must outlive its owner while the container runs: \(show)")
        let released = try mvm("alloc", "release", "--dead")
        #expect(released.stdoutText.hasPrefix("released 0 grants"), "a held grant is not reclaimed: \(released.stdoutText)")

        // The sweep ends the orphaned container and removes its state, then the grant follows.
        let gc = try mvm("gc")
        #expect(gc.status == 0 && gc.stdoutText.hasPrefix("reclaimed 1 grant"), "\(gc.stdoutText)\(gc.stderrText)")
        #expect(try mvm("alloc", "show").stdoutText.contains("grants      0"))
        #expect(gc.stdoutText.contains(name))
        #expect(!(try mvm("ps").stdoutText.contains(name)))
        #expect(!FileManager.default.fileExists(atPath: "/sys/fs/cgroup/microvm/\(name)"))
    }

    static let canRunHosted = getuid() == 0 && HostProfile.current().capability("libvirt-embed").usable

    /// The case that once handed resources out twice: a hosted VM with a tap, its `mvm` killed.
    /// QEMU keeps the memory, so the grant stays; `mvm stop` ends QEMU, deletes the tap and
    /// reclaims the grant, and the killed run's libvirt root goes.
    @Test(.enabled(if: canRunHosted, "needs root and libvirt's embedded QEMU driver"))
    func aKilledHostedRunKeepsItsGrantUntilQEMUIsStoppedAndLeavesNoTap() throws {
        let (env, dir) = try Self.stateDirectory()
        defer { KillSafetyCLITests.removeStateDirectory(dir) }
        func mvm(_ args: String...) throws -> ProcessRunner.Output { try MVM.run(args, environment: env, timeout: 150) }
        let name = "killvm-\(UUID().uuidString.prefix(6).lowercased())"
        let tap = "mvt" + HostLinks.interfaceTag(name)

        let run = try ChildProcess([try #require(MVM.binary), "run", "--mode", "hosted", "--net", "tap", "--name", name, "--memory", "256M",
                                    "--timeout", "280", "--", "sleep", "300"], environment: env)
        defer { run.signal(SIGKILL); _ = run.wait(timeout: 10); _ = try? mvm("stop", name); TapDevice.delete(tap) }
        let held = try eventually(90) { try mvm("alloc", "show").stdoutText.contains("held by qemu") }
        let shown = try mvm("alloc", "show").stdoutText
        #expect(held, "the grant must name QEMU as its holder: \(shown)")
        #expect(FileManager.default.fileExists(atPath: "/sys/class/net/" + tap))

        run.signal(SIGKILL)
        #expect(!run.wait(timeout: 10).timedOut)
        #expect(try mvm("alloc", "release", "--dead").stdoutText.hasPrefix("released 0 grants"), "QEMU still holds the grant's memory")
        #expect(try mvm("ps").stdoutText.contains(name), "the orphaned VM is still listed")

        let stop = try mvm("stop", name)
        #expect(stop.status == 0, "\(stop.stderrText)")
        #expect(!FileManager.default.fileExists(atPath: "/sys/class/net/" + tap), "mvm stop must delete the tap the killed run made")
        #expect(try mvm("alloc", "show").stdoutText.contains("grants      0"), "mvm stop must reclaim the killed run's grant")
        let gc = try mvm("gc")
        #expect(gc.stdoutText.hasPrefix("reclaimed 0 grants"), "\(gc.stdoutText)\(gc.stderrText)")
        let roots = EmbeddedRoots.roots(sharing: Paths(state: dir + "/state", cache: Paths.default.cache))
        #expect(roots.isEmpty, "the killed run's libvirt root must go: \(roots)")
    }

    /// A direct VM with a tap, its `mvm` killed: the VMM follows its parent out, and the tap and
    /// cgroup the run made (named in its record before they were made) go at the next sweep,
    /// with the grant.
    @Test(.enabled(if: getuid() == 0 && HostProfile.current().kvm.verdict != .absent, "needs root and /dev/kvm"))
    func aKilledDirectRunLeavesNoVMMTapOrCgroupAfterGC() throws {
        let (env0, dir) = try Self.stateDirectory()
        defer { KillSafetyCLITests.removeStateDirectory(dir) }
        let env = env0.merging(["MVM_DIRECT_ALLOW_EMULATED": "1"]) { $1 }
        func mvm(_ args: String...) throws -> ProcessRunner.Output { try MVM.run(args, environment: env, timeout: 60) }
        let kernel = dir + "/tiny.elf"
        try Data(TinyGuest.pvhELF()).write(to: URL(fileURLWithPath: kernel))
        let name = "killdv-\(UUID().uuidString.prefix(6).lowercased())"
        let tap = "mvt" + HostLinks.interfaceTag(name)
        let cgroups = ["cpu", "memory", "pids", "cpuset", ""].map { "/sys/fs/cgroup/\($0)/microvm/direct-\(name)".replacingOccurrences(of: "//", with: "/") }

        let run = try ChildProcess([try #require(MVM.binary), "run", "--mode", "direct", "--kernel", kernel, "--no-rootfs", "--net", "tap",
                                    "--name", name, "--timeout", "120", "--", "true"], environment: env)
        defer { run.signal(SIGKILL); _ = run.wait(timeout: 10); TapDevice.delete(tap) }
        let held = try eventually(30) { try mvm("alloc", "show").stdoutText.contains("held by mvm-vmm") }
        #expect(held, "the grant must name the VMM as its holder")
        #expect(FileManager.default.fileExists(atPath: "/sys/class/net/" + tap))
        #expect(cgroups.contains { FileManager.default.fileExists(atPath: $0) })

        run.signal(SIGKILL)
        #expect(!run.wait(timeout: 10).timedOut)
        // The VMM watches its parent and ends with it.
        let vmmGone = eventually(10) {
            (try? ProcessRunner.run(["pgrep", "-f", "mvm-vmm.*--id \(name)"], timeout: 10))?.stdoutText.isEmpty ?? true
        }
        #expect(vmmGone, "the VMM must end with its mvm")
        let gc = try mvm("gc")
        #expect(gc.stdoutText.hasPrefix("reclaimed 1 grant"), "\(gc.stdoutText)\(gc.stderrText)")
        #expect(!FileManager.default.fileExists(atPath: "/sys/class/net/" + tap), "the killed run's tap must go")
        #expect(!cgroups.contains { FileManager.default.fileExists(atPath: $0) }, "the killed run's cgroup must go")
        #expect(!(try mvm("ps").stdoutText.contains(name)))
    }
}

/// `mvm` killed with SIGKILL at each phase of a launch: just after its grant (nothing started
/// yet), just after the backend started (the VMM, QEMU or the container exists, the guest is
/// still booting) and, for containers, once the command runs; the VMs' running phase is
/// `KillSafetyCLITests`'. `MVM_STOP_AT` stops the run at
/// the phase so the kill lands there. Then, after `mvm gc` (and `mvm stop` of a VM that outlives
/// its `mvm` by design, as hosted QEMU does), nothing is left: no instance, grant, tap, cgroup,
/// record or VMM; and at no point does the ledger hold more than the host.
@Suite("Kill at every launch phase", .serialized, .timeLimit(.minutes(6)))
struct KillAtPhaseCLITests {
    /// The modes, and Docker's containers apart: their holder is Docker's container, not an init of ours.
    enum Mode: String, CaseIterable { case direct, hosted, container, docker }

    static func usable(_ mode: Mode) -> Bool {
        guard getuid() == 0 else { return false }
        switch mode {
        case .direct: return HostProfile.current().kvm.verdict != .absent
        case .hosted: return HostProfile.current().capability("libvirt-embed").usable
        case .container: return ProcessRunner.which("runc") != nil
        case .docker: return HostProfile.current().capability("docker").usable
        }
    }

    /// After the grant and once the backend started, for every mode; for containers, Docker's
    /// included, also once the command runs (`ready`: killed when the grant's holder is known,
    /// not stopped). The VMs' running phase is `KillSafetyCLITests`'.
    static let cases: [(Mode, LaunchPhase)] = Mode.allCases.flatMap { m in [(m, LaunchPhase.granted), (m, .spawned)] }
        + [(.container, .ready), (.docker, .ready)]

    @Test(.enabled(if: getuid() == 0, "needs root"), arguments: cases)
    func aRunKilledAtAPhaseLeavesNothingAfterGC(mode: Mode, phase: LaunchPhase) throws {
        guard Self.usable(mode) else {
            print("skipped: \(mode.rawValue) cannot run on this host")
            return
        }
        let dir = "/tmp/mvm-killphase-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { KillSafetyCLITests.removeStateDirectory(dir) }
        let env = ["MVM_STATE_DIR": dir + "/state", "MVM_DIRECT_ALLOW_EMULATED": "1"]
        func mvm(_ args: String...) throws -> ProcessRunner.Output { try MVM.run(args, environment: env, timeout: 150) }
        let name = "kp\(mode.rawValue.prefix(2))\(phase.rawValue.prefix(1))-\(UUID().uuidString.prefix(6).lowercased())"
        let tap = "mvt" + HostLinks.interfaceTag(name)
        var argv = [try #require(MVM.binary), "run", "--mode", mode == .docker ? "container" : mode.rawValue, "--name", name, "--memory", "256M", "--timeout", "280"]
        switch mode {
        case .direct:
            let kernel = dir + "/tiny.elf"
            try Data(TinyGuest.pvhELF()).write(to: URL(fileURLWithPath: kernel))
            argv += ["--kernel", kernel, "--no-rootfs", "--net", "tap"]
        case .hosted: argv += ["--net", "tap"]
        case .container: break
        case .docker: argv += ["--runtime", "docker"]
        }
        let err = try ProcessRunner.makePipe()
        let running = phase == .ready
        let run = try ChildProcess(argv + ["--", "sleep", "300"], stderr: .descriptor(err.write),
                                   environment: running ? env : env.merging(["MVM_STOP_AT": phase.rawValue]) { $1 })
        close(err.write)
        defer { close(err.read); run.signal(SIGKILL); _ = run.wait(timeout: 10); _ = try? mvm("stop", name); TapDevice.delete(tap) }

        if running {
            // Running: the grant names the process that holds it.
            let held = eventually(90) { ((try? mvm("alloc", "show"))?.stdoutText ?? "").contains("held by") }
            #expect(held, "the \(mode.rawValue) run never showed its holder")
        } else {
            // Stopped at the phase (state T in /proc/PID/stat), then killed there.
            let stopped = eventually(120) {
                let stat = (try? String(contentsOfFile: "/proc/\(run.pid)/stat", encoding: .utf8)) ?? ""
                return stat.split(separator: ")").last?.split(separator: " ").first == "T"
            }
            #expect(stopped, "the run never reached \(phase.rawValue)")
        }
        run.signal(SIGKILL)
        #expect(!run.wait(timeout: 10).timedOut)
        #expect(Self.ledgerWithinCapacity(try mvm("alloc", "show").stdoutText))

        // A sweep; a VM that outlives its mvm by design (hosted QEMU) is listed and stopped.
        _ = try mvm("gc")
        let listed = try mvm("ps").stdoutText
        if listed.contains(name) {
            #expect(mode == .hosted, "only a hosted VM outlives its mvm: \(listed)")
            #expect(try mvm("stop", name).status == 0)
            _ = try mvm("gc")
        }
        #expect(!(try mvm("ps").stdoutText.contains(name)), "\(mode.rawValue) at \(phase.rawValue): still listed")
        let show = try mvm("alloc", "show").stdoutText
        #expect(show.contains("grants      0"), "\(mode.rawValue) at \(phase.rawValue): a grant is left: \(show)")
        #expect(!FileManager.default.fileExists(atPath: "/sys/class/net/" + tap), "\(mode.rawValue) at \(phase.rawValue): the tap is left")
        let cgroups = ((try? FileManager.default.contentsOfDirectory(atPath: "/sys/fs/cgroup")) ?? []).flatMap { h in
            ((try? FileManager.default.contentsOfDirectory(atPath: "/sys/fs/cgroup/\(h)/microvm")) ?? []).filter { $0.contains(name) }
        }
        #expect(cgroups.isEmpty, "\(mode.rawValue) at \(phase.rawValue): cgroups left: \(cgroups)")
        let vmm = try ProcessRunner.run(["pgrep", "-f", "--id \(name)"], timeout: 10).stdoutText
        #expect(vmm.isEmpty, "\(mode.rawValue) at \(phase.rawValue): a VMM is left: \(vmm)")
        let records = (FileManager.default.enumerator(atPath: dir + "/state")?.allObjects as? [String] ?? []).filter { $0.contains(name) && $0.hasSuffix(".json") }
        #expect(records.isEmpty, "\(mode.rawValue) at \(phase.rawValue): records left: \(records)")
    }

    /// `mvm alloc show`'s memory line: what is granted never exceeds what is grantable.
    static func ledgerWithinCapacity(_ show: String) -> Bool {
        guard let line = show.split(separator: "\n").first(where: { $0.hasPrefix("memory") }) else { return false }
        func kib(_ label: String) -> UInt64? {
            guard let r = line.range(of: " " + label) else { return nil }
            let before = line[..<r.lowerBound].split(separator: " ").last ?? ""
            let digits = before.filter(\.isNumber)
            let unit = before.last
            guard let n = UInt64(digits) else { return nil }
            return unit == "G" ? n << 20 : unit == "M" ? n << 10 : n
        }
        guard let grantable = kib("grantable"), let granted = kib("granted") else { return false }
        return granted <= grantable
    }

    func eventually(_ seconds: Double, _ body: () -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if body() { return true }
            usleep(50_000)
        }
        return body()
    }
}
