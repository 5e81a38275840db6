import Foundation
import Testing
import MicroVMCore
import Host
import Images
#if canImport(FoundationXML)
import FoundationXML
#endif
@testable import Bench

/// What the real runs need, checked once; a suite that cannot run says why.
enum RealHost {
    static let profile = HostProfile.current()
    static let isRoot = getuid() == 0
    static var runcReady: Bool { isRoot && profile.capability("runc").usable }
    static var reason: Comment {
        if !isRoot { return "needs root (cgroups, mount namespaces, runc)" }
        let c = profile.capability("runc")
        return c.usable ? "runnable" : "runc is not usable here: \(c.detail)"
    }
    static func paths() throws -> Paths {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mvm-bench-state-\(UUID().uuidString.prefix(8))").path
        try Paths.ensureDirectory(dir)
        return Paths(state: dir, cache: Paths.default.cache)
    }
}

@Suite(.serialized, .timeLimit(.minutes(15)), .enabled(if: RealHost.runcReady, RealHost.reason))
struct RealRunTests {
    /// The `--quick` matrix restricted to what is cheap here: native and runc, two repeats.
    @Test func quickRunWritesJSONMarkdownAndSVG() async throws {
        let paths = try RealHost.paths()
        let out = paths.state + "/out"
        defer { try? FileManager.default.removeItem(atPath: paths.state) }
        let image = try ImageStore(paths: paths).ensureDefault()
        let targets = BackendCatalog.targets(["native", "runc", "direct"], host: RealHost.profile,
                                             factories: BackendCatalog.standardFactories(image: image, paths: paths))
        var d = BenchDurations.quick
        d.cpuSeconds = 1; d.syscallSeconds = 1; d.instanceTimeout = 120
        let slice = ResourceSlice(cpus: 1, placement: .shared, memory: .mebibytes(256), pidsLimit: 512)
        let plan = BenchPlan(scenarios: [StartLatency(), CPUThroughput(), SyscallLatency()], targets: targets, repeats: 2,
                             context: BenchContext(workload: Workload(image: image), slice: slice, durations: d), preset: "quick")
        let report = await BenchRunner(plan: plan, progress: { print($0) }).run(host: RealHost.profile)
        let files = try BenchOutput.write(report, to: out)

        let back = try BenchReport.load(path: files.json)
        #expect(back.schemaVersion == BenchReport.currentSchemaVersion)
        #expect(back.host.cores == RealHost.profile.onlineCPUs.count)
        #expect(back.backends.map(\.name) == ["native", "runc", "direct"])
        for backend in ["native", "runc"] {
            for metric in ["start-serial", "start-parallel-2", "sysbench-cpu", "syscall-sched-yield"] {
                let c = back.cells.first { $0.backend == backend && $0.metric == metric }
                #expect(c?.status == .ok, "\(backend) \(metric): \(c?.note ?? "missing") \(c?.failures ?? [])")
                #expect((c?.samples.count ?? 0) >= 2)
                #expect((c?.stats?.median ?? 0) > 0)
            }
        }
        let runcCPU = back.cell(scenario: "cpu", metric: "sysbench-cpu", backend: "runc")
        #expect(runcCPU?.ratioToNative != nil)
        if RealHost.profile.kvm.verdict != .hardware {
            let direct = back.cell(scenario: "cpu", metric: "sysbench-cpu", backend: "direct")
            #expect(direct?.status == .unavailable)
            #expect(direct?.note?.contains("emulated") == true || direct?.note?.contains("/dev/kvm") == true)
        }
        print(MarkdownReport.render(back))

        let md = try String(contentsOfFile: files.markdown, encoding: .utf8)
        let row = md.split(separator: "\n").first { $0.hasPrefix("| cpu |") }.map(String.init) ?? ""
        let cols = row.split(separator: "|", omittingEmptySubsequences: false).map { $0.trimmingCharacters(in: .whitespaces) }
        #expect(cols.count == 8)
        #expect(cols.count == 8 && cols[4].hasSuffix("×1.00") && cols[5].contains("×") && cols[6].hasPrefix("unavailable") == (RealHost.profile.kvm.verdict != .hardware))

        #expect(files.charts.count == 4)
        for chart in files.charts {
            let doc = try XMLDocument(contentsOf: URL(fileURLWithPath: chart))
            let root = try #require(doc.rootElement())
            func walk(_ e: XMLElement) -> [XMLElement] { [e] + (e.children ?? []).compactMap { $0 as? XMLElement }.flatMap(walk) }
            let classes = walk(root).compactMap { e in e.attributes?.first { $0.name == "class" }?.stringValue }
            #expect(classes.filter { $0 == "bar" }.count == 2, "\(chart)")
            #expect(classes.filter { $0 == "errorbar" }.count == 2, "\(chart)")
        }
    }

    /// A memory bomb in a container is stopped by the container's limit; its neighbour keeps running.
    @Test func containerMemoryBombIsContainedAndVictimSurvives() async throws {
        let paths = try RealHost.paths()
        defer { try? FileManager.default.removeItem(atPath: paths.state) }
        let image = try ImageStore(paths: paths).ensureDefault()
        let targets = BackendCatalog.targets(["runc"], host: RealHost.profile,
                                             factories: BackendCatalog.standardFactories(image: image, paths: paths))
        var d = BenchDurations.quick
        d.victimSeconds = 2; d.instanceTimeout = 120
        let slice = ResourceSlice(cpus: 1, placement: .shared, memory: .mebibytes(128), pidsLimit: 256)
        let plan = BenchPlan(scenarios: [NoisyNeighbour(aggressors: [.memoryBomb])], targets: targets, repeats: 1,
                             context: BenchContext(workload: Workload(image: image), slice: slice, durations: d))
        let report = await BenchRunner(plan: plan).run(host: RealHost.profile)
        let cell = try #require(report.cell(scenario: "noisy-neighbour", metric: "victim-slowdown-memory-bomb", backend: "runc"))
        #expect(cell.status == .ok, "\(cell.note ?? "") \(cell.failures)")
        let d0 = try #require(cell.details.first)
        print("runc memory bomb (256 MiB into a 128 MiB container): victim slowdown \(cell.samples.first.map { String(format: "%.1f%%", $0) } ?? "?"), victim alone \(d0["victimAlone"] ?? "?") ev/s, beside \(d0["victimBeside"] ?? "?") ev/s; aggressor: \(d0["aggressor"] ?? "?"); host: \(d0["host"] ?? "?")")
        #expect(d0["aggressorContained"] == "true")
        #expect(d0["aggressor"]?.contains("OOM-killed") == true || d0["aggressor"]?.contains("contained") == true)
        #expect(d0["victim"] == "survived")
        #expect(d0["host"]?.hasPrefix("survived") == true)
        #expect(Double(d0["victimBeside"] ?? "") ?? 0 > 0)
    }
}

extension RealHost {
    static var hostedReady: Bool {
        isRoot && profile.capability("qemu").usable && profile.capability("libvirt-embed").usable
    }
    static var hostedReason: Comment {
        if !isRoot { return "needs root" }
        for name in ["qemu", "libvirt-embed"] where !profile.capability(name).usable {
            return "\(name) is not usable here: \(profile.capability(name).detail)"
        }
        return "runnable"
    }
}

/// The hosted VM in the bench as `--quick` runs it: a real boot under libvirt, labelled with the
/// acceleration it really got (TCG on a host without hardware KVM), its ratio from raw samples.
@Suite(.serialized, .timeLimit(.minutes(15)), .enabled(if: RealHost.hostedReady, RealHost.hostedReason))
struct HostedBenchTests {
    /// libvirt's embedded driver takes one root per process, held until exit: the same root as
    /// the hosted boot tests (LibvirtTests), removed when the process ends.
    static let paths: Paths = {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mvm-hosted-\(getpid())").path
        atexit { try? FileManager.default.removeItem(at: FileManager.default.temporaryDirectory.appendingPathComponent("mvm-hosted-\(getpid())")) }
        return Paths(state: dir, cache: Paths.default.cache)
    }()

    @Test func quickStartOfAHostedVMIsMeasuredAndLabelled() async throws {
        let paths = Self.paths
        try Paths.ensureDirectory(paths.state)
        let out = paths.state + "/bench-out-\(UUID().uuidString.prefix(8))"
        defer { try? FileManager.default.removeItem(atPath: out) }
        let image = try ImageStore(paths: paths).ensureDefault()
        let targets = BackendCatalog.targets(["native", "hosted"], host: RealHost.profile,
                                             factories: BackendCatalog.standardFactories(image: image, paths: paths))
        var d = BenchDurations.quick
        d.instanceTimeout = 480
        let slice = ResourceSlice(cpus: 1, placement: .shared, memory: .mebibytes(256), pidsLimit: 512)
        // The CLI's --quick settings for VMs without hardware KVM: one serial start per cell.
        let plan = BenchPlan(scenarios: [StartLatency()], targets: targets, repeats: 2,
                             context: BenchContext(workload: Workload(image: image), slice: slice, durations: d), preset: "quick",
                             emulatedVMRepeats: 1, emulatedVMScenarios: ["start", "cpu"])
        let report = await BenchRunner(plan: plan, progress: { print($0) }).run(host: RealHost.profile)
        let files = try BenchOutput.write(report, to: out)
        let back = try BenchReport.load(path: files.json)

        let hardware = RealHost.profile.kvm.verdict == .hardware
        let record = try #require(back.backends.first { $0.name == "hosted" })
        #expect(record.available)
        #expect(record.acceleration == (hardware ? "hardware KVM" : "TCG"))
        let serial = try #require(back.cell(scenario: "start", metric: "start-serial", backend: "hosted"))
        #expect(serial.status == .ok, "\(serial.note ?? "") \(serial.failures)")
        #expect(serial.samples.count == (hardware ? 2 : 1))
        #expect(serial.samples.allSatisfy { $0 > 0 })
        let native = try #require(back.cell(scenario: "start", metric: "start-serial", backend: "native"))
        // The ratio is the bench's, from the raw samples: recompute it here.
        let expected = try #require(Statistics.ratio(serial.samples, to: native.samples))
        #expect(serial.ratioToNative == expected)
        #expect(expected.median > 1, "a VM boot cannot start faster than a process")
        print("hosted start (\(record.acceleration)): \(serial.samples.map { String(format: "%.0f ms", $0) }), ×\(String(format: "%.1f", expected.median)) native")
        if !hardware {
            let parallel = back.cells.first { $0.backend == "hosted" && $0.metric.hasPrefix("start-parallel") }
            #expect(parallel?.status == .unavailable)
            let md = try String(contentsOfFile: files.markdown, encoding: .utf8)
            #expect(md.contains("TCG"))
            #expect(!md.contains("hardware KVM"))
        }
    }
}

@Suite(.serialized, .timeLimit(.minutes(5)), .enabled(if: RealHost.isRoot, "needs root: the native backend mounts /dev and /proc in a private namespace"))
struct NativeBackendTests {
    @Test func runsInTheImageTreeWithItsOwnBinaries() async throws {
        let paths = try RealHost.paths()
        defer { try? FileManager.default.removeItem(atPath: paths.state) }
        let image = try ImageStore(paths: paths).ensureDefault()
        let r = try await NativeBackend().run(VMSpec(name: "native-test", command: ["sh", "-c", "readlink /bin/sh; ls /proc/self/status; exit 3"], rootfs: image.rootfsTree, timeout: 30))
        #expect(r.exitStatus == 3)
        #expect(r.output.contains("busybox"))
        #expect(r.output.contains("/proc/self/status"))
        // The private mounts did not leak into the shared tree.
        #expect(!FileManager.default.fileExists(atPath: image.rootfsTree + "/proc/self"))
        await #expect(throws: MicroVMError.self) {
            try await NativeBackend().run(VMSpec(name: "native-timeout", command: ["sleep", "5"], rootfs: "/", timeout: 0.5))
        }
    }
}
