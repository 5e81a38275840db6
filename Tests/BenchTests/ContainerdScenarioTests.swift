import Foundation
import Testing
import MicroVMCore
import Host
import DirectVMM
import Images
import Libvirt
@testable import Bench

/// The containerd scenario: which runtime a target measures, and real `ctr run`s through a
/// containerd of the scenario's own with runc and with mvm-runtime.
@Suite(.serialized, .timeLimit(.minutes(10)))
struct ContainerdScenarioTests {
    /// The built mvm, as the scenario finds it (mvm-runtime is mvm under that name).
    static let mvm = VMMProcess.companion("mvm", environment: "MVM_BINARY")
    static let ready = getuid() == 0 && ["containerd", "ctr", "runc", "busybox"].allSatisfy { ProcessRunner.which($0) != nil }

    /// A busybox tree with the mount points a read-only root needs.
    static func busyboxTree(_ dir: String) throws -> String {
        let root = dir + "/rootfs"
        for d in ["bin", "proc", "sys", "dev", "run", "tmp", "etc"] { try Paths.ensureDirectory(root + "/" + d) }
        try FileManager.default.copyItem(atPath: try #require(ProcessRunner.which("busybox")), toPath: root + "/bin/busybox")
        for applet in ["sh", "echo", "sleep", "cat", "mount", "uname"] { try FileManager.default.createSymbolicLink(atPath: root + "/bin/" + applet, withDestinationPath: "busybox") }
        return root
    }

    static func target(_ name: String) -> BenchTarget {
        let mode = BackendCatalog.mode(of: name)
        return BenchTarget(record: BackendRecord(name: name, mode: mode, acceleration: BackendCatalog.acceleration(mode: mode, kvm: HostProfile.current().kvm.verdict),
                                                 available: true, versions: [:]), backend: nil)
    }

    static func context(_ tree: String) -> BenchContext {
        var d = BenchDurations.quick
        d.instanceTimeout = 240
        return BenchContext(workload: Workload(rootfsTree: tree, source: "busybox test tree"),
                            slice: ResourceSlice(cpus: 1, placement: .shared, memory: .mebibytes(256), pidsLimit: 512), durations: d)
    }

    static func leftovers(_ marker: String) throws -> String {
        try ProcessRunner.run(["pgrep", "-af", marker], timeout: 10).stdoutText
            .split(separator: "\n").filter { !$0.contains("pgrep") }.joined(separator: "\n")
    }

    @Test func eachTargetMeasuresItsOwnRuntimeOrSaysWhyNot() throws {
        let dir = FileManager.default.temporaryDirectory.path + "/mvm-ctrd-test-\(getpid())"
        try Paths.ensureDirectory(dir)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for name in ["native", "docker", "qemu-microvm"] {
            #expect(throws: ScenarioUnavailable.self) { _ = try ContainerdScenario.runtime(for: name, kvm: .emulated, linkDirectory: dir) }
        }
        // mvm-runtime's VMs are hosted where KVM is not hardware, direct where it is.
        do {
            _ = try ContainerdScenario.runtime(for: "direct", kvm: .emulated, linkDirectory: dir)
            Issue.record("direct was measured where mvm-runtime runs hosted VMs")
        } catch let e as ScenarioUnavailable {
            #expect(e.reason.contains("as hosted VMs"), "\(e)")
        }
        #expect(throws: ScenarioUnavailable.self) { _ = try ContainerdScenario.runtime(for: "hosted", kvm: .hardware, linkDirectory: dir) }
        // mvm-runtime is the built mvm under that name.
        let mvm = try #require(Self.mvm, "the built mvm is next to the test bundle")
        let r = try ContainerdScenario.runtime(for: "hosted", kvm: .emulated, linkDirectory: dir)
        #expect((r.binary as NSString).lastPathComponent == "mvm-runtime" && r.label == "mvm-runtime (hosted VMs)")
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: r.binary) == mvm)
        if ProcessRunner.which("runsc") != nil {
            // gVisor runs without a network of its own, as mvm's runsc runs do.
            let r = try ContainerdScenario.runtime(for: "runsc", kvm: .emulated, linkDirectory: dir)
            #expect(FileManager.default.isExecutableFile(atPath: r.binary) && r.label == "runsc --network=none")
            #expect(try String(contentsOfFile: r.binary, encoding: .utf8).contains("--network=none \"$@\""))
        } else {
            print("runsc is not installed: its wrapper is not checked")
        }
        #expect(ContainerdScenario().metrics(for: Self.context("/x")).map(\.id) == ["containerd-start-exit", "containerd-first-output", "containerd-idle-pss"])
    }

    @Test(.enabled(if: ready, "needs root, containerd, ctr, runc and busybox-static"))
    func runcThroughContainerdIsTimedAndItsIdlePodWeighed() async throws {
        let dir = FileManager.default.temporaryDirectory.path + "/mvm-ctrd-runc-\(getpid())"
        try Paths.ensureDirectory(dir)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let tree = try Self.busyboxTree(dir)
        let ms = try await ContainerdScenario(runs: 2).measure(Self.target("runc"), Self.context(tree))
        print("containerd + runc: " + ms.map { "\($0.metric.id)=\(String(format: "%.1f", $0.value))" }.joined(separator: " "))
        let exits = ms.filter { $0.metric == ContainerdScenario.startExit }.map(\.value)
        let firsts = ms.filter { $0.metric == ContainerdScenario.firstOutput }.map(\.value)
        #expect(exits.count == 2 && exits.allSatisfy { $0 > 0 })
        #expect(firsts.count == 2 && zip(firsts, exits).allSatisfy { $0 > 0 && $0 <= $1 }, "the first output comes before the exit")
        let pss = try #require(ms.first { $0.metric == ContainerdScenario.idlePSS })
        #expect(pss.value > 0.1 && pss.value < 200, "an idle runc pod is its shim and a sleeping busybox: \(pss.value) MiB")
        #expect(Int(pss.details["processes"] ?? "") ?? 0 >= 2, "the shim and the container's process: \(pss.details)")
        #expect(pss.details["runtime"] == "runc")
        // The scenario's containerd, its shims and their containers are gone, and so is its directory.
        #expect(try Self.leftovers("mvm-bench-ctrd-\(getpid())").isEmpty)
        #expect(try Self.leftovers("-id bench-\(getpid())-").isEmpty && Self.leftovers("-id bench-idle-\(getpid())-").isEmpty)
        let mine = try FileManager.default.contentsOfDirectory(atPath: FileManager.default.temporaryDirectory.path).filter { $0.hasPrefix("mvm-bench-ctrd-\(getpid())-") }
        #expect(mine.isEmpty, "\(mine)")
    }

    /// The audit looks from inside a pod of containerd's too: with runc there, the host's kernel
    /// and a PID namespace of the pod's own, as in mvm's own runc instance; nothing left after.
    @Test(.enabled(if: ready && RealHost.runcReady && ProbeTree.gccReady, "needs root, containerd, runc and gcc with libc6-dev"))
    func theAuditAlsoLooksFromInsideContainerdsPods() async throws {
        let paths = try RealHost.paths()
        defer { try? FileManager.default.removeItem(atPath: paths.state) }
        let targets = BackendCatalog.targets(["runc"], host: RealHost.profile, factories: BackendCatalog.standardFactories(image: nil, paths: paths))
        var audit = IsolationAudit(context: Self.context(try ProbeTree.tree()))
        audit.containerd = ContainerdScenario(runs: 1)
        let a = await audit.run(targets)
        print(MarkdownReport.renderAudit(a))
        #expect(a.entries.map(\.backend) == ["runc", "containerd+runc"])
        let pod = try #require(a.entry("containerd+runc"))
        #expect(pod.status == .ok, "\(pod.note ?? "")")
        #expect(pod.sharesHostKernel == true && pod.seesHostPIDs == false)
        #expect(pod.probe?.processes.selfPID == 1 && pod.probe?.processes.pid1 == "mvm-audit")
        #expect(pod.probe?.devices.sensitive["kvm"] == "absent")
        #expect(try Self.leftovers("mvm-bench-ctrd-\(getpid())").isEmpty)
        #expect(try Self.leftovers("-id bench-audit-\(getpid())-").isEmpty)
    }

    /// mvm-runtime through containerd: each container a VM of the mode this host gives it.
    @Test(.enabled(if: ready && RealHost.hostedReady && HostProfile.current().kvm.verdict != .hardware && Self.mvm != nil && ProbeTree.gccReady,
                   "needs root, containerd, busybox-static, the built mvm, gcc and a hosted VM backend"))
    func mvmRuntimeThroughContainerdRunsEachContainerAsAVM() async throws {
        let dir = FileManager.default.temporaryDirectory.path + "/mvm-ctrd-vm-\(getpid())"
        try Paths.ensureDirectory(dir + "/state")
        defer {
            _ = try? ProcessRunner.run([Self.mvm ?? "mvm", "gc"], environment: ["MVM_STATE_DIR": dir + "/state"], timeout: 60)
            try? FileManager.default.removeItem(atPath: dir)
        }
        let tree = try Self.busyboxTree(dir)
        let scenario = ContainerdScenario(runs: 1, environment: ["MVM_STATE_DIR": dir + "/state"])
        let ms = try await scenario.measure(Self.target("hosted"), Self.context(tree))
        // The probe, through containerd into the VM: a kernel of the pod's own.
        try Paths.ensureDirectory(tree + "/usr/bin")
        try FileManager.default.copyItem(atPath: try ProbeTree.tree() + RootfsBuilder.probePath, toPath: tree + RootfsBuilder.probePath)
        let audit = scenario.audit(Self.target("hosted"), Self.context(tree))
        print("containerd + mvm-runtime, audit: \(audit.status) \(audit.note ?? "") kernel \(audit.probe?.kernel.release ?? "?")")
        #expect(audit.backend == "containerd+mvm-runtime" && audit.status == .ok, "\(audit.note ?? "")")
        #expect(audit.sharesHostKernel == false && audit.seesHostPIDs == false)
        print("containerd + mvm-runtime: " + ms.map { "\($0.metric.id)=\(String(format: "%.1f", $0.value))" }.joined(separator: " "))
        let exit = try #require(ms.first { $0.metric == ContainerdScenario.startExit })
        #expect(exit.details["runtime"] == "mvm-runtime (hosted VMs)" && exit.details["acceleration"] == "TCG")
        let pss = try #require(ms.first { $0.metric == ContainerdScenario.idlePSS })
        #expect(pss.value > 32, "an idle mvm-runtime pod holds a QEMU and its guest: \(pss.value) MiB")
        let ps = try ProcessRunner.run([Self.mvm!, "ps"], environment: ["MVM_STATE_DIR": dir + "/state"], timeout: 60)
        #expect(ps.stdoutText.split(separator: "\n").count <= 1, "no VM left: \(ps.stdoutText)")
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: dir + "/state/runtime-disks")) ?? []).isEmpty, "no disk left")
        #expect(EmbeddedRoots.roots(sharing: Paths(state: dir + "/state", cache: Paths.default.cache)).isEmpty, "no libvirt root left")
    }
}
