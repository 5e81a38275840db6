import Foundation
import Synchronization
import Testing
@testable import Launch
import MicroVMCore

/// The launch path's order and bookkeeping, on a backend that records what it was handed.
@Suite struct InstanceLauncherTests {
    final class Recorder: Sendable {
        let plans = Mutex<[LaunchPlan]>([])
        let events = Mutex<[String]>([])
    }

    struct RecordingBackend: InstanceBackend {
        let mode: RunMode
        let recorder: Recorder
        var fail = false
        var kernelParameters: String { "pci=off" }
        func execute(_ plan: LaunchPlan) async throws -> RunResult {
            recorder.plans.withLock { $0.append(plan) }
            recorder.events.withLock { $0.append("execute") }
            plan.clock.mark(.spawned)
            plan.holder(4242, "test holder")
            plan.clock.mark(.ready)
            if fail { throw MicroVMError(.backend, "the instance failed") }
            return plan.result(status: 0, output: "", console: "")
        }
    }

    struct RecordingGrants: GrantSource {
        let recorder: Recorder
        func acquire(_ request: ResourceSlice, owner: String, mode: RunMode) throws -> GrantLease {
            recorder.events.withLock { $0.append("grant \(owner)") }
            var s = request
            s.cpuSet = [1]
            return GrantLease(slice: s, release: { [recorder] in recorder.events.withLock { $0.append("release \(owner)") } },
                              hold: { [recorder] pid, what in recorder.events.withLock { $0.append("held by \(what) \(pid)") } })
        }
    }

    static let artifacts = BootArtifacts(kernel: "/img/vmlinuz", initrd: "/img/initrd", rootfsDisk: "/img/rootfs.ext4", rootfsTree: "/", kernelVersion: "6.1")

    @Test func phasesAreInOrderAndTheGrantIsReleasedAfterTheRun() async throws {
        let rec = Recorder()
        let launcher = InstanceLauncher(grants: RecordingGrants(recorder: rec), image: { Self.artifacts })
        let spec = VMSpec(name: "vm-1", cpus: 1, memory: .mebibytes(128), disks: [], command: ["echo", "hi"], timeout: 30)
        let r = try await launcher.launch(spec, on: RecordingBackend(mode: .hosted, recorder: rec))
        let phases = try #require(r.phases)
        let order: [LaunchPhase] = [.validated, .granted, .planned, .spawned, .ready, .exited]
        let times = try order.map { try #require(phases[$0], "\($0) not marked") }
        #expect(times == times.sorted())
        #expect(r.bootSeconds == phases.start)
        #expect(rec.events.withLock { $0 } == ["grant vm-1", "execute", "held by test holder 4242", "release vm-1"])

        let plan = try #require(rec.plans.withLock { $0.first })
        #expect(plan.enforcement.cpuSet == [1] && plan.enforcement.cpuQuota == 1)
        #expect(plan.disks.first == DiskSpec(path: "/img/rootfs.ext4", readOnly: true) && plan.rootfsAttached)
        #expect(plan.kernel == "/img/vmlinuz" && plan.initrd == "/img/initrd")
        #expect(plan.cmdline.hasPrefix("console=ttyS0 quiet loglevel=3 reboot=k panic=-1 mvm.cmd="))
        #expect(plan.cmdline.contains("pci=off mvm.ro=1"))
    }

    @Test func badInputIsRefusedBeforeAnyGrant() async throws {
        let rec = Recorder()
        let launcher = InstanceLauncher(grants: RecordingGrants(recorder: rec), image: { Self.artifacts })
        await #expect(throws: MicroVMError.self) {
            try await launcher.launch(VMSpec(name: "bad", command: ["true"], timeout: 0), on: RecordingBackend(mode: .container, recorder: rec))
        }
        #expect(rec.events.withLock { $0 }.isEmpty)
    }

    @Test func aFailingRunStillReleasesItsGrant() async throws {
        let rec = Recorder()
        let launcher = InstanceLauncher(grants: RecordingGrants(recorder: rec), image: { Self.artifacts })
        await #expect(throws: MicroVMError.self) {
            try await launcher.launch(VMSpec(name: "c-1", command: ["true"]), on: RecordingBackend(mode: .container, recorder: rec, fail: true))
        }
        #expect(rec.events.withLock { $0 } == ["grant c-1", "execute", "held by test holder 4242", "release c-1"])
    }

    @Test func theInitsNetworkParametersAreOnTheOneCommandLine() throws {
        let rec = Recorder()
        var spec = VMSpec(name: "net-1", command: ["true"])
        spec.net = NetSpec(hostAddress: "10.9.8.1", guestAddress: "10.9.8.2")
        let plan = try InstanceLauncher(image: { Self.artifacts }).plan(spec, slice: ResourceSlice(cpus: 1, memory: .mebibytes(128)),
                                                                         backend: RecordingBackend(mode: .direct, recorder: rec))
        #expect(plan.cmdline.contains("mvm.ip=10.9.8.2/30 mvm.gw=10.9.8.1"))
        // A container plan has no kernel or command line, only the tree.
        let c = try InstanceLauncher(image: { Self.artifacts }).plan(VMSpec(name: "c", command: ["true"]), slice: ResourceSlice(cpus: 1, memory: .mebibytes(64)),
                                                                      backend: RecordingBackend(mode: .container, recorder: rec))
        #expect(c.kernel == nil && c.cmdline.isEmpty && c.rootfsTree == "/")
    }
}
