import Foundation
import Testing
import MicroVMCore
import Images
import Containers
@testable import Bench

/// Probe output as an instance gives it, and the host it is compared with.
enum AuditFixtures {
    static let host = AuditHost(release: "6.18.44-fc", version: "#1 SMP PREEMPT_DYNAMIC @0", bootID: "host-boot", pidNamespace: "pid:[4026531836]")

    static func probeLine(bootID: String = "host-boot", release: String = "6.18.44-fc", pidNamespace: String = "pid:[4026532001]",
                          visible: Int = 1, pid1: String = "mvm-audit", mount: String = "denied (EPERM)", version: Int = 1) -> String {
        """
        {"probe":"mvm-audit","probeVersion":\(version),"kernel":{"release":"\(release)","version":"#1 SMP PREEMPT_DYNAMIC @0","machine":"x86_64","bootID":"\(bootID)"},\
        "processes":{"selfPID":1,"visible":\(visible),"pid1":"\(pid1)","pidNamespace":"\(pidNamespace)"},\
        "identity":{"uid":0,"capEff":"00000000a80425fb","seccomp":"2","noNewPrivs":"1"},\
        "devices":{"count":15,"block":"","sensitive":{"kvm":"absent","mem":"absent","kmsg":"absent","vda":"absent"}},\
        "host":{"procKcore":"empty (masked)","sysFirmware":"empty","cgroupRoot":"10 entries","cgroupEntries":"cpu,memory","cgroupDirs":0,"selfCgroup":"0::/"},\
        "syscalls":{"mount":"\(mount)","ptrace":"denied (EPERM)","bpf":"denied (EPERM)","perf_event_open":"denied (EPERM)",\
        "add_key":"denied (EPERM)","userfaultfd":"denied (EPERM)","io_uring_setup":"allowed","unshare_user":"not implemented (ENOSYS)"}}
        """
    }
}

@Suite struct ProbeParsingTests {
    @Test func findsTheProbeLineAmongConsoleNoise() throws {
        let output = "@@mvm:container-started@@\n[    1.234] random: crng init done\r\n" + AuditFixtures.probeLine() + "\nmvm init: powering off\n"
        let p = try ProbeReport.parse(output).get()
        #expect(p.kernel.release == "6.18.44-fc")
        #expect(p.processes.pid1 == "mvm-audit")
        #expect(p.devices.sensitive["kvm"] == "absent")
        #expect(p.host.procKcore == "empty (masked)")
        #expect(p.syscalls["io_uring_setup"] == "allowed")
        #expect(p.syscalls["unshare_user"] == "not implemented (ENOSYS)")
    }

    @Test(arguments: ["", "sh: /usr/bin/mvm-audit: not found\n", "\u{0}\u{ff}garbage{{{", "{\"probe\":\"something-else\"}"])
    func outputWithoutAProbeLineIsAFailureThatQuotesIt(_ output: String) {
        guard case .failure(let f) = ProbeReport.parse(output) else { Issue.record("parsed garbage: \(output.debugDescription)"); return }
        #expect(f.reason.hasPrefix("no probe output"))
    }

    @Test func truncatedOutputIsAFailureNotACrash() {
        let line = AuditFixtures.probeLine()
        // Every cut of the line, as a VM powering off mid-write or a killed container would leave it.
        for cut in stride(from: 25, to: line.count - 1, by: 7) {
            let result = ProbeReport.parse(String(line.prefix(cut)))
            guard case .failure(let f) = result else { Issue.record("a line cut at \(cut) parsed"); continue }
            #expect(f.reason.contains("truncated or malformed"), "cut at \(cut): \(f.reason)")
        }
    }

    @Test func aProbeOfAnotherVersionIsRefusedWithTheFix() {
        guard case .failure(let f) = ProbeReport.parse(AuditFixtures.probeLine(version: 2)) else { Issue.record("version 2 parsed"); return }
        #expect(f.reason.contains("mvm image build --force"))
    }

    @Test func entryFromGarbageIsAFailedEntryWithTheExitStatus() {
        let e = AuditEntry.from(backend: "hosted", output: "Kernel panic - not syncing", exitStatus: 137, host: AuditFixtures.host)
        #expect(e.status == .failed)
        #expect(e.probe == nil)
        #expect(e.note?.hasPrefix("probe failed (exit status 137)") == true)
        #expect(e.note?.contains("Kernel panic") == true)
    }
}

@Suite struct AuditVerdictTests {
    @Test func containerSharesTheKernelButNotThePIDs() {
        let e = AuditEntry.from(backend: "runc", output: AuditFixtures.probeLine(), exitStatus: 0, host: AuditFixtures.host)
        #expect(e.status == .ok)
        #expect(e.sharesHostKernel == true)
        #expect(e.seesHostPIDs == false)
    }

    @Test func nativeSeesTheHostsPIDs() {
        let line = AuditFixtures.probeLine(pidNamespace: "pid:[4026531836]", visible: 80, pid1: "systemd", mount: "allowed")
        let e = AuditEntry.from(backend: "native", output: line, exitStatus: 0, host: AuditFixtures.host)
        #expect(e.sharesHostKernel == true)
        #expect(e.seesHostPIDs == true)
    }

    /// A VM's init PID namespace has the same inode number as the host's: only the boot ID tells them apart.
    @Test func vmWithTheSameReleaseAndNamespaceInodeIsItsOwnKernel() {
        let line = AuditFixtures.probeLine(bootID: "guest-boot", pidNamespace: "pid:[4026531836]", visible: 40, pid1: "init")
        let e = AuditEntry.from(backend: "hosted", output: line, exitStatus: 0, host: AuditFixtures.host)
        #expect(e.sharesHostKernel == false)
        #expect(e.seesHostPIDs == false)
    }

    @Test func withoutABootIDTheUnameDecides() {
        let line = AuditFixtures.probeLine(release: "4.4.0").replacingOccurrences(of: ",\"bootID\":\"host-boot\"", with: "")
        var host = AuditFixtures.host
        host.bootID = nil
        let e = AuditEntry.from(backend: "runsc", output: line, exitStatus: 0, host: host)
        #expect(e.probe?.kernel.bootID == nil)
        #expect(e.sharesHostKernel == false)
    }
}

@Suite struct AuditReportTests {
    static func record() -> AuditRecord {
        let h = AuditFixtures.host
        return AuditRecord(host: h, entries: [
            AuditEntry.from(backend: "native", output: AuditFixtures.probeLine(pidNamespace: "pid:[4026531836]", visible: 80, pid1: "systemd", mount: "allowed"),
                            exitStatus: 0, host: h),
            AuditEntry.from(backend: "runc", output: AuditFixtures.probeLine(), exitStatus: 0, host: h),
            AuditEntry.from(backend: "hosted", output: "{\"probe\":\"mvm-audit\",\"probeVer", exitStatus: 1, host: h),
            AuditEntry(backend: "direct", status: .unavailable, note: "host KVM is emulated; run inside `mvm rig run`"),
        ])
    }

    @Test func markdownHasAColumnPerBackendAndARowPerCheck() throws {
        let md = MarkdownReport.renderAudit(Self.record())
        let lines = md.split(separator: "\n").map(String.init)
        let header = try #require(lines.first { $0.hasPrefix("| check |") })
        #expect(header == "| check | native | runc | hosted | direct |")
        func row(_ title: String) -> [String]? {
            lines.first { $0.hasPrefix("| \(title) |") }.map { l in
                l.split(separator: "|", omittingEmptySubsequences: false).dropFirst(2).dropLast().map { $0.trimmingCharacters(in: .whitespaces) }
            }
        }
        #expect(row("probe")?[0] == "ok")
        #expect(row("probe")?[2].hasPrefix("failed: probe failed (exit status 1): probe output is truncated") == true)
        #expect(row("probe")?[3] == "unavailable: host KVM is emulated; run inside `mvm rig run`")
        #expect(row("kernel is") == ["the host's", "the host's", "—", "—"])
        #expect(row("PID namespace") == ["the host's: host processes visible", "its own", "—", "—"])
        #expect(row("mount (tmpfs on a fresh directory)") == ["allowed", "denied (EPERM)", "—", "—"])
        #expect(row("io_uring_setup")?.prefix(2) == ["allowed", "allowed"])
        #expect(row("seccomp mode; no_new_privs")?[1] == "filter; 1")
        #expect(row("/dev/kvm")?[0] == "absent")
        // Every syscall the probe tried has its row; every row has one cell per backend.
        for (_, title) in ProbeReport.syscallChecks { #expect(row(title)?.count == 4, "\(title)") }
        #expect(md.contains("Host: kernel 6.18.44-fc"))
    }

    @Test func theFullReportCarriesTheAuditAndOldFilesStillDecode() throws {
        var report = Fixtures.report()
        let old = try report.encoded()
        #expect(try BenchReport.decode(old).audit == nil)
        #expect(!MarkdownReport.render(report).contains("Isolation audit"))

        report.audit = Self.record()
        let back = try BenchReport.decode(report.encoded())
        #expect(back.audit == Self.record())
        let md = MarkdownReport.render(back)
        #expect(md.contains("## Isolation audit"))
        #expect(md.contains("| check | native | runc | hosted | direct |"))
    }
}

/// A backend whose instances print whatever it is given.
struct ScriptedBackend: InstanceBackend {
    let mode: RunMode
    let output: String
    var status: Int32 = 0
    func execute(_ plan: LaunchPlan) async throws -> RunResult {
        plan.clock.mark(.ready)
        return plan.result(status: status, output: output, console: output)
    }
}

@Suite struct IsolationAuditRunTests {
    /// A tree with an executable standing in for the probe, so `probeMissing` lets the run through.
    static func treeWithProbe() throws -> String {
        let tree = FileManager.default.temporaryDirectory.appendingPathComponent("mvm-audit-tree-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: tree + "/usr/bin", withIntermediateDirectories: true)
        _ = FileManager.default.createFile(atPath: tree + RootfsBuilder.probePath, contents: Data("#!/bin/true\n".utf8), attributes: [.posixPermissions: 0o755])
        return tree
    }

    func context(_ tree: String) -> BenchContext {
        var d = BenchDurations.quick
        d.instanceTimeout = 5; d.cellMargin = 5
        return BenchContext(workload: Workload(rootfsTree: tree, source: "test"), slice: Fixtures.slice, durations: d)
    }

    @Test func eachBackendGetsAnEntryWhateverItsOutput() async throws {
        let tree = try Self.treeWithProbe()
        defer { try? FileManager.default.removeItem(atPath: tree) }
        let targets = [
            BenchTarget(record: BackendRecord(name: "runc", mode: .container, acceleration: "none", available: true),
                        backend: ScriptedBackend(mode: .container, output: AuditFixtures.probeLine())),
            BenchTarget(record: BackendRecord(name: "hosted", mode: .hosted, acceleration: "TCG", available: true),
                        backend: ScriptedBackend(mode: .hosted, output: "\u{1b}[0m garbage", status: 1)),
            BenchTarget(record: BackendRecord(name: "direct", mode: .direct, acceleration: "emulated KVM", available: false, unavailableReason: "no KVM"),
                        backend: nil),
        ]
        let a = await IsolationAudit(context: context(tree)).run(targets, host: AuditFixtures.host)
        #expect(a.entries.map(\.backend) == ["runc", "hosted", "direct"])
        #expect(a.entry("runc")?.status == .ok)
        #expect(a.entry("runc")?.seesHostPIDs == false)
        #expect(a.entry("hosted")?.status == .failed)
        #expect(a.entry("direct")?.status == .unavailable)
        #expect(a.entry("direct")?.note == "no KVM")
    }

    @Test func aTreeWithoutTheProbeIsUnavailableWithTheFix() async {
        let target = BenchTarget(record: BackendRecord(name: "runc", mode: .container, acceleration: "none", available: true),
                                 backend: ScriptedBackend(mode: .container, output: AuditFixtures.probeLine()))
        let missing = await IsolationAudit(context: context("/nonexistent-tree")).audit(target, host: AuditFixtures.host)
        #expect(missing.status == .unavailable)
        #expect(missing.note?.contains("mvm image build --force") == true)
        let hostTree = await IsolationAudit(context: context("/")).audit(target, host: AuditFixtures.host)
        #expect(hostTree.status == .unavailable)
        #expect(hostTree.note?.contains("--workload host") == true)
    }
}

/// The compiled probe, run for real: natively on this host and in containers.
enum ProbeTree {
    /// A minimal root: the static probe and the mount points runtimes need. Built once per process.
    struct SetupFailed: Error, CustomStringConvertible { var description: String }

    static let built: Result<String, SetupFailed> = {
        do { return .success(try build()) } catch { return .failure(SetupFailed(description: "cannot build the probe tree: \(error)")) }
    }()

    static func build() throws -> String {
        let tree = FileManager.default.temporaryDirectory.appendingPathComponent("mvm-audit-root-\(getpid())").path
        for d in ["usr/bin", "proc", "sys", "dev", "tmp"] {
            try FileManager.default.createDirectory(atPath: tree + "/" + d, withIntermediateDirectories: true)
        }
        chmod(tree + "/tmp", 0o1777)
        try RootfsBuilder.compileProbe(source: RootfsBuilder.defaultProbeSource, output: tree + RootfsBuilder.probePath)
        atexit { try? FileManager.default.removeItem(atPath: FileManager.default.temporaryDirectory.appendingPathComponent("mvm-audit-root-\(getpid())").path) }
        return tree
    }

    static func tree() throws -> String { try built.get() }

    static var gccReady: Bool { FileManager.default.isExecutableFile(atPath: "/usr/bin/gcc") && FileManager.default.fileExists(atPath: "/usr/include/stdio.h") }

    static func audit(_ names: [String], paths: Paths) async throws -> AuditRecord {
        let tree = try Self.tree()
        let targets = BackendCatalog.targets(names, host: RealHost.profile, factories: BackendCatalog.standardFactories(image: nil, paths: paths))
        var d = BenchDurations.quick
        d.instanceTimeout = 60
        let slice = ResourceSlice(cpus: 1, placement: .shared, memory: .mebibytes(128), pidsLimit: 64)
        let ctx = BenchContext(workload: Workload(rootfsTree: tree, source: "probe tree"), slice: slice, durations: d)
        let a = await IsolationAudit(context: ctx, progress: { print($0) }).run(targets)
        print(MarkdownReport.renderAudit(a))
        return a
    }

    /// One backend's audit entry, which must have run, and its probe report.
    static func probe(on backend: String) async throws -> (AuditRecord, AuditEntry, ProbeReport) {
        let paths = try RealHost.paths()
        defer { try? FileManager.default.removeItem(atPath: paths.state) }
        let a = try await audit([backend], paths: paths)
        let e = try #require(a.entry(backend))
        #expect(e.status == .ok, "\(e.note ?? "")")
        return (a, e, try #require(e.probe))
    }
}

@Suite(.serialized, .timeLimit(.minutes(5)),
       .enabled(if: RealHost.isRoot && ProbeTree.gccReady, "needs root (the native backend mounts /proc in a private namespace) and gcc with libc6-dev"))
struct ProbeNativeTests {
    /// On the host itself nothing is isolated: the host's kernel and processes, every call allowed.
    @Test func nativeSeesTheHostAndMayDoEverything() async throws {
        let (a, e, p) = try await ProbeTree.probe(on: "native")
        #expect(p.kernel.release == a.host.release)
        #expect(e.sharesHostKernel == true)
        #expect(e.seesHostPIDs == true)
        #expect(p.processes.visible > 5)
        #expect(p.processes.selfPID != 1)
        #expect(p.identity.uid == 0)
        for key in ["mount", "ptrace", "add_key"] {
            #expect(p.syscalls[key] == "allowed", "\(key): \(p.syscalls[key] ?? "missing")")
        }
        // The native backend chroots into the workload tree, and the kernel refuses a new user
        // namespace to a chrooted process (unshare(2): EPERM "in a chroot environment").
        #expect(p.syscalls["unshare_user"] == "denied (EPERM)")
        // The probe undid what it did: no temporary mount or directory is left in the tree.
        let tmp = try FileManager.default.contentsOfDirectory(atPath: try ProbeTree.tree() + "/tmp")
        #expect(tmp.isEmpty, "\(tmp)")
        let mounts = try String(contentsOfFile: "/proc/self/mounts", encoding: .utf8)
        #expect(!mounts.contains("mvm-audit"))
    }
}

@Suite(.serialized, .timeLimit(.minutes(5)), .enabled(if: RealHost.runcReady && ProbeTree.gccReady, RealHost.reason))
struct ProbeRuncTests {
    /// runc: the host's kernel, but its own PID namespace, no host devices, masked firmware, and
    /// the calls our seccomp profile lists (OCISpec.deniedSyscalls) refused with EPERM.
    @Test func runcDeniesWhatItsSeccompProfileLists() async throws {
        let (_, e, p) = try await ProbeTree.probe(on: "runc")
        #expect(e.sharesHostKernel == true)
        #expect(e.seesHostPIDs == false)
        #expect(p.processes.selfPID == 1)
        #expect(p.processes.pid1 == "mvm-audit")
        #expect(p.processes.visible < 5)
        #expect(p.identity.seccomp == "2")
        #expect(p.devices.sensitive["kvm"] == "absent")
        #expect(p.devices.block.isEmpty, "\(p.devices.block)")
        #expect(p.host.procKcore != "readable")
        #expect(p.host.sysFirmware == "empty" || p.host.sysFirmware == "absent")
        let probeNames = ["mount": "mount", "ptrace": "ptrace", "bpf": "bpf", "perf_event_open": "perf_event_open",
                          "add_key": "add_key", "userfaultfd": "userfaultfd", "unshare_user": "unshare", "io_uring_setup": "io_uring_setup"]
        for (key, syscall) in probeNames where OCISpec.deniedSyscalls.contains(syscall) {
            #expect(p.syscalls[key] == "denied (EPERM)", "\(key): \(p.syscalls[key] ?? "missing")")
        }
        #expect(OCISpec.deniedSyscalls.contains("io_uring_setup"), "the audit found io_uring allowed in runc; the profile lists it now")
        // Run on the host directly, the same probe is allowed what the profile refuses: the refusals are the profile's.
        let direct = try ProcessRunner.run([try ProbeTree.tree() + RootfsBuilder.probePath], timeout: 30)
        let native = try ProbeReport.parse(direct.stdoutText).get()
        #expect(native.syscalls["bpf"] == "allowed" && native.syscalls["io_uring_setup"] == "allowed")
    }
}

extension RealHost {
    static var dockerReady: Bool {
        isRoot && (try? ProcessRunner.run(["docker", "version", "--format", "{{.Server.Version}}"], timeout: 15))?.status == 0
    }
}

@Suite(.serialized, .timeLimit(.minutes(5)),
       .enabled(if: RealHost.dockerReady && ProbeTree.gccReady, "needs root and a running Docker engine ('dockerd --iptables=false --bridge=none &')"))
struct ProbeDockerTests {
    /// Docker's own default seccomp profile and capabilities: no mount, no bpf, its own PIDs.
    @Test func dockerKeepsTheKernelButNotThePIDsOrMounts() async throws {
        let before = Set(Self.rootfsImages())
        defer { for tag in Set(Self.rootfsImages()).subtracting(before) { _ = try? ProcessRunner.run(["docker", "image", "rm", tag], timeout: 60) } }
        let (_, e, p) = try await ProbeTree.probe(on: "docker")
        #expect(e.sharesHostKernel == true)
        #expect(e.seesHostPIDs == false)
        #expect(p.processes.pid1 == "mvm-audit")
        #expect(p.devices.sensitive["kvm"] == "absent")
        #expect(p.syscalls["mount"]?.hasPrefix("denied") == true, "\(p.syscalls["mount"] ?? "missing")")
        #expect(p.syscalls["bpf"]?.hasPrefix("denied") == true, "\(p.syscalls["bpf"] ?? "missing")")
    }

    static func rootfsImages() -> [String] {
        let out = try? ProcessRunner.run(["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}", "microvm-rootfs"], timeout: 30)
        return out?.stdoutText.split(separator: "\n").map(String.init) ?? []
    }
}
