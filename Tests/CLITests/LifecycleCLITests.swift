import Foundation
import Testing
import MicroVM
import Synchronization

/// A direct instance's whole lifecycle through the command line, as a user drives it: `run -d`
/// returns once it is up, then `ps`, `pause`, `stats`, `resume`, `logs` and `stop`. The guest is
/// a tiny PVH image (this host's KVM may be emulated; it cannot boot Linux).
@Suite("Instance lifecycle from the command line", .serialized, .timeLimit(.minutes(3)))
struct LifecycleCLITests {
    @Test(.enabled(if: HostProfile.current().kvm.verdict != .absent, "no /dev/kvm"))
    func aDetachedDirectInstanceIsPausedResumedCountedAndStopped() throws {
        let dir = "/tmp/mvm-lifecycle-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { KillSafetyCLITests.removeStateDirectory(dir) }
        let kernel = dir + "/tiny.elf"
        try Data(TinyGuest.pvhELF()).write(to: URL(fileURLWithPath: kernel))
        let env = ["MVM_STATE_DIR": dir + "/state", "MVM_DIRECT_ALLOW_EMULATED": "1"]
        let name = "life-\(UUID().uuidString.prefix(6).lowercased())"
        func mvm(_ args: String...) throws -> ProcessRunner.Output { try MVM.run(args, environment: env, timeout: 60) }

        let run = try mvm("run", "-d", "--mode", "direct", "--kernel", kernel, "--no-rootfs", "--name", name, "--timeout", "120", "--", "true")
        #expect(run.status == 0 && run.stdoutText == name + "\n", "\(run.stdoutText) \(run.stderrText)")
        defer { _ = try? mvm("stop", name) }
        #expect(try mvm("ps").stdoutText.contains(name))

        #expect(try mvm("pause", name).status == 0)
        let paused = try mvm("stats", name)
        #expect(paused.status == 0 && paused.stdoutText.contains("mvm_vmm_state 2"), "\(paused.stdoutText)\(paused.stderrText)")
        let again = try mvm("pause", name)
        #expect(again.status == 2 && again.stderrText.contains("already paused"), "\(again.stderrText)")
        #expect(try mvm("resume", name).status == 0)
        #expect(try mvm("stats", name).stdoutText.contains("mvm_vmm_state 1"))
        #expect(try mvm("logs", name).stdoutText.hasPrefix("K"), "the tiny guest's first byte on COM1")

        // `logs -f` prints what is there, follows, and returns once the instance has ended.
        let follow = Process()
        follow.executableURL = URL(fileURLWithPath: try #require(MVM.binary))
        follow.arguments = ["logs", "-f", name]
        follow.environment = ProcessInfo.processInfo.environment.merging(env) { $1 }
        let followed = Pipe()
        follow.standardOutput = followed
        try follow.run()
        // Stop only once `logs -f` has found the instance and printed what is there.
        var seen = Data()
        while !seen.starts(with: Data("K".utf8)) {
            let chunk = followed.fileHandleForReading.availableData
            if chunk.isEmpty { break }
            seen.append(chunk)
        }
        let stop = try mvm("stop", name)
        #expect(stop.status == 0, "\(stop.stderrText)")
        let deadline = Date().addingTimeInterval(10)
        while follow.isRunning && Date() < deadline { usleep(20_000) }
        #expect(!follow.isRunning, "logs -f must return once the instance has ended")
        if follow.isRunning { follow.terminate() }
        seen.append(followed.fileHandleForReading.readDataToEndOfFile())
        #expect(String(decoding: seen, as: UTF8.self).hasPrefix("K"))
        #expect(!(try mvm("ps").stdoutText.contains(name)))
        let left = try mvm("pause", name)
        #expect(left.status == 2 && left.stderrText.contains("no instance named"), "\(left.stderrText)")
    }

    /// The bench runs its direct VMs in its own process, and stops what a timed-out cell left
    /// through `stop(name:)`; a user may `mvm stop` one of them from another shell. Either way the
    /// VM is stopped through its VMM: a SIGTERM to the holder would end the bench and every
    /// instance it runs. The holder sees the run end, cleans up, and lives on.
    @Test(.enabled(if: HostProfile.current().kvm.verdict != .absent, "no /dev/kvm"), arguments: [false, true])
    func stoppingAVMWhoseHolderRunsOthersLeavesTheHolderRunning(fromAnotherProcess: Bool) async throws {
        let dir = "/tmp/mvm-shared-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { KillSafetyCLITests.removeStateDirectory(dir) }
        let kernel = dir + "/idle.elf"
        try Data(TinyGuest.pvhELF(code: TinyGuest.idle)).write(to: URL(fileURLWithPath: kernel))
        let paths = Paths(state: dir + "/state", cache: Paths.default.cache)
        // Held here, the record names this process; for another process, it says its holder is shared.
        let backend = DirectBackend(options: .init(allowEmulatedKVM: true, paths: paths, attachRootfs: false, sharedHolder: fromAnotherProcess))
        let name = "shared-\(UUID().uuidString.prefix(6).lowercased())"
        termsCaught.store(0, ordering: .relaxed)
        let previous = signal(SIGTERM) { _ in termsCaught.add(1, ordering: .relaxed) }
        defer { signal(SIGTERM, previous) }

        let run = Task { try await backend.run(VMSpec(name: name, kernel: kernel, command: ["true"], timeout: 120)) }
        func listed() async -> InstanceInfo? { ((try? await backend.list()) ?? []).first { $0.name == name } }
        // A wait, not a time target: the VMM is up once its API answers.
        let deadline = Date().addingTimeInterval(60)
        while await listed()?.state != "running", Date() < deadline { try await Task.sleep(for: .milliseconds(50)) }
        let info = try #require(await listed(), "the instance never ran")
        #expect(info.pid != getpid(), "listed with the VMM's pid: \(info)")

        if fromAnotherProcess {
            // On a thread of its own: the run it stops needs this process's task threads to end.
            let environment = ["MVM_STATE_DIR": paths.state, "MVM_DIRECT_ALLOW_EMULATED": "1"]
            let stop = try await withCheckedThrowingContinuation { done in
                Thread.detachNewThread { done.resume(with: Result { try MVM.run(["stop", name], environment: environment, timeout: 60) }) }
            }
            #expect(stop.status == 0, "\(stop.stderrText)")
        } else {
            try await backend.stop(name: name)
        }
        let result = await run.result
        #expect(termsCaught.load(ordering: .relaxed) == 0, "the stop signalled the process that holds the VM")
        if case .success(let r) = result { Issue.record("the idle guest reported a result: status \(r.exitStatus)") }
        #expect(await listed() == nil, "the stopped instance is still listed")
        #expect(ProcessIdentity.isAlive(pid: try #require(info.pid), startTime: nil) == false, "its VMM outlived the stop")
    }

    /// Two hosted VMs, each run by an `mvm` of its own, at once: each process has a libvirt
    /// root of its own (the embedded driver locks a root for one process), both are listed and
    /// stopped, and neither root is left. Without an agent, `mvm exec` says how to get one.
    @Test(.enabled(if: KillSafetyCLITests.canRunHosted, "needs root and libvirt's embedded QEMU driver"))
    func twoHostedRunsInTwoProcessesRunSideBySide() throws {
        let a = try DetachedInstance("side-a"), b = try DetachedInstance("side-b", sharing: a)
        defer { b.end(); a.end() }
        for vm in [a, b] {
            try vm.start(["--mode", "hosted", "--memory", "256M", "--timeout", "280", "--", "sh", "-c", "while :; do echo up >/dev/ttyS0; sleep 1; done"])
        }
        let ps = try a("ps").stdoutText
        for vm in [a, b] {
            #expect(ps.split(separator: "\n").contains { $0.hasPrefix(vm.name + " ") && $0.contains("hosted") && $0.contains("running") }, "\(vm.name): \(ps)")
        }
        let roots = { EmbeddedRoots.roots(sharing: Paths(state: a.dir + "/state", cache: Paths.default.cache)) }
        #expect(roots().count == 2, "a root per run: \(roots())")
        // Started without the agent, a hosted VM has nothing to exec in: said, with how.
        let exec = try a("exec", a.name, "--", "true")
        #expect(exec.status == 2 && exec.stderrText.contains("has no agent: start it with --vsock CID --vsock-shell"), "\(exec.stderrText)")
        for vm in [a, b] { #expect(try vm("stop", vm.name).status == 0) }
        #expect(try a("ps").stdoutText.split(separator: "\n").count == 1)
        #expect(try a("alloc", "show").stdoutText.contains("grants      0"))
        let deadline = Date().addingTimeInterval(15)
        while !roots().isEmpty, Date() < deadline { usleep(200_000) }
        #expect(roots().isEmpty, "each run's root goes with it: \(roots())")
    }

    @Test func pausingAnInstanceThatDoesNotExistNamesIt() throws {
        let out = try MVM.run(["pause", "no-such-instance"])
        #expect(out.status == 2 && out.stderrText.contains("no instance named 'no-such-instance'"), "\(out.stderrText)")
    }
}

/// SIGTERMs that reach this process while a test catches them (a SIGTERM would end the run).
let termsCaught = Atomic<Int>(0)
