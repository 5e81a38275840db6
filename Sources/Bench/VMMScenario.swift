import Foundation
import MicroVMCore
import Host
import KVM
import DirectVMM
import VMM
import VMMAPI
#if canImport(Glibc)
import Glibc
#endif

/// The VMM alone, apart from any workload: how soon it runs guest code, how long a whole VMM
/// process lives for a guest that resets at once, and what it costs in memory beyond the guest's
/// RAM. `mvm-vmm` (the direct mode's VMM) against QEMU's microvm on the same KVM, each sample
/// paired with a run of `mvm-kvm-floor`, a C program that makes the same KVM calls and nothing
/// else. Tiny PVH guests, so it runs on any KVM, an emulated one included (labelled so); where
/// KVM is real (the nested rig) it also boots Linux on both, to init and to a ping of the host.
public struct VMMScenario: BenchScenario {
    public let name = "vmm"
    public static let firstRun = Metric("vmm-first-run", "VMM exec → first KVM_RUN (tiny guest)", unit: "ms", higherIsBetter: false)
    public static let whole = Metric("vmm-whole", "VMM process exec → exit (tiny guest that resets at once)", unit: "ms", higherIsBetter: false)
    public static let mvmRun = Metric("vmm-mvm-run", "Whole `mvm run --mode direct` (tiny guest reporting success): command → exit", unit: "ms", higherIsBetter: false)
    public static let floor = Metric("vmm-floor", "C floor (mvm-kvm-floor) exec → exit, paired with this VMM's runs", unit: "ms", higherIsBetter: false)
    public static let pss = Metric("vmm-pss", "VMM PSS beyond guest RAM (128 MiB guest, 1 disk, 1 tap, idle)", unit: "MiB", higherIsBetter: false)
    public static let manyVMMs = 4
    public static let pssMany = Metric("vmm-pss-\(manyVMMs)", "VMM PSS beyond guest RAM, per VMM with \(manyVMMs) running (same devices)", unit: "MiB", higherIsBetter: false)
    public static let linuxBoot = Metric("vmm-linux-boot", "Linux boot to init (launch request → ready)", unit: "ms", higherIsBetter: false)
    public static let linuxPing = Metric("vmm-linux-ping", "Linux guest → host ping round trip (average)", unit: "ms", higherIsBetter: false)
    /// Tiny-guest runs per repeat, each paired with a floor run.
    public static let runs = 10
    public static let guestMiB = 128

    public init() {}
    public func metrics(for ctx: BenchContext) -> [Metric] { [Self.firstRun, Self.whole, Self.mvmRun, Self.floor, Self.pss, Self.pssMany, Self.linuxBoot, Self.linuxPing] }
    public var note: String? {
        "tiny PVH guests on this host's /dev/kvm, whatever it is (each sample's details name it): whole = posix_spawn → waitpid of the VMM, "
            + "interleaved with mvm-kvm-floor (the same KVM calls in C; its figure in each sample's details as floor_ms) and, for direct, "
            + "the whole `mvm run` a user types (validation, grant, cgroup, VMM, result); first KVM_RUN from "
            + "mvm-vmm's milestones (QEMU reports none); PSS of the VMM process less its guest RAM mapping, the guest idle in hlt; "
            + "the Linux rows only where KVM is real"
    }
    public func runsPerMeasure(_ ctx: BenchContext) -> Int { 2 }
    public var needsBackend: Bool { false }

    enum VMM { case direct(String), qemu(String, kvm: KVMProbeResult.Verdict) }

    public func measure(_ target: BenchTarget, _ ctx: BenchContext) async throws -> [Measurement] {
        let vmm: VMM
        switch target.name {
        case "direct":
            guard let b = VMMProcess.companion("mvm-vmm", environment: "MVM_VMM") else { throw ScenarioUnavailable("mvm-vmm is not built") }
            vmm = .direct(b)
        case "qemu-microvm":
            guard let q = ProcessRunner.which("qemu-system-x86_64") else { throw ScenarioUnavailable("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)") }
            vmm = .qemu(q, kvm: HostProfile.current().kvm.verdict)
        default:
            throw ScenarioUnavailable("the vmm scenario compares VMMs: it runs on direct and qemu-microvm")
        }
        let kvm = HostProfile.current().kvm.verdict
        guard kvm != .absent else { throw ScenarioUnavailable("no usable /dev/kvm") }
        guard let floor = VMMProcess.companion("mvm-kvm-floor", environment: "MVM_KVM_FLOOR") else {
            throw ScenarioUnavailable("mvm-kvm-floor is not built (swift build --product mvm-kvm-floor)")
        }
        let acceleration = BackendCatalog.acceleration(mode: .direct, kvm: kvm)
        let dir = FileManager.default.temporaryDirectory.path + "/mvm-bench-vmm-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try Paths.ensureDirectory(dir)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let reset = dir + "/reset.elf", idle = dir + "/idle.elf", reports = dir + "/reports.elf"
        try Data(TinyGuest.pvhELF(code: TinyGuest.resetAtOnce)).write(to: URL(fileURLWithPath: reset))
        try Data(TinyGuest.pvhELF(code: TinyGuest.idle)).write(to: URL(fileURLWithPath: idle))
        try Data(TinyGuest.pvhELF(code: TinyGuest.reportsSuccess)).write(to: URL(fileURLWithPath: reports))
        var env: [String: String] = [:]
        if kvm == .emulated { env["MVM_DIRECT_ALLOW_EMULATED"] = "1" }
        // What a user types, for direct: the whole command, beside the VMM alone and the floor.
        var mvm: String?
        if case .direct = vmm { mvm = VMMProcess.companion("mvm", environment: "MVM_BINARY") }

        var out: [Measurement] = []
        for i in 0..<Self.runs {
            // Each run starts one step further on: no step always follows the same one.
            var floorMs = 0.0, vmmMs = 0.0, first: Double?, runMs: Double?
            for k in 0..<3 {
                switch (i + k) % 3 {
                case 0: floorMs = try Self.timed([floor, "--memory-mib", "\(Self.guestMiB)", reset], environment: env).ms
                case 1:
                    let r = try runToExit(vmm, guest: reset, dir: dir, environment: env)
                    vmmMs = r.ms; first = r.firstRun
                default:
                    guard let mvm else { continue }
                    let name = "bench-vmm-run-\(getpid())-\(i)"
                    runMs = try Self.timed([mvm, "run", "--mode", "direct", "--kernel", reports, "--no-rootfs", "--name", name,
                                            "--memory", "\(Self.guestMiB)M", "--", "true"], environment: env).ms
                    // A run keeps its console log for `mvm logs`; the bench's throwaway instances go.
                    try? FileManager.default.removeItem(atPath: Paths.default.instances + "/" + name)
                }
            }
            let details = ["acceleration": acceleration, "floor_ms": String(format: "%.2f", floorMs), "guest": "tiny PVH, resets at once"]
            out.append(Measurement(Self.whole, vmmMs, details: details))
            out.append(Measurement(Self.floor, floorMs, details: details))
            if let first { out.append(Measurement(Self.firstRun, first, details: details)) }
            if let runMs { out.append(Measurement(Self.mvmRun, runMs, details: details.merging(["guest": "tiny PVH, prints the init's framed result"]) { $1 })) }
        }
        if case .qemu = vmm {
            out.append(.unavailable(Self.firstRun, "QEMU reports no time of its first KVM_RUN"))
            out.append(.unavailable(Self.mvmRun, "no mvm mode runs QEMU's microvm directly"))
        } else if mvm == nil {
            out.append(.unavailable(Self.mvmRun, "the mvm binary was not found (set MVM_BINARY)"))
        }
        out.append(try idlePSS(vmm, count: 1, metric: Self.pss, guest: idle, dir: dir + "/one", environment: env, acceleration: acceleration))
        out.append(try idlePSS(vmm, count: Self.manyVMMs, metric: Self.pssMany, guest: idle, dir: dir + "/many", environment: env,
                               acceleration: acceleration))
        out += try await linux(target, ctx)
        return out
    }

    /// A program's life, posix_spawn to waitpid, in ms; an exit other than 0 is an error.
    static func timed(_ argv: [String], environment: [String: String], success: Int32 = 0) throws -> (ms: Double, started: Double) {
        let t0 = Monotonic.seconds()
        let child = try ChildProcess(argv, environment: environment)
        let (status, timedOut) = child.wait(timeout: 60)
        let ms = (Monotonic.seconds() - t0) * 1000
        guard !timedOut else { child.signal(SIGKILL); _ = child.wait(); throw MicroVMError(.timeout, "\(argv[0]) ran a tiny guest for more than 60 s") }
        guard status == success else { throw MicroVMError(.backend, "\((argv[0] as NSString).lastPathComponent) ran the tiny guest and exited with status \(status)") }
        return (ms, t0)
    }

    func runToExit(_ vmm: VMM, guest: String, dir: String, environment: [String: String]) throws -> (ms: Double, firstRun: Double?) {
        switch vmm {
        case .direct(let binary):
            let config = try Self.writeConfig(dir + "/reset.json", guest: guest), timings = dir + "/timings.json"
            unlink(timings)
            let r = try Self.timed([binary, "--config-file", config, "--console-log", "/dev/null", "--timings-file", timings], environment: environment)
            let milestones = FileManager.default.contents(atPath: timings).flatMap { try? JSONDecoder().decode([String: Double].self, from: $0) }
            return (r.ms, milestones?["firstInstruction"].map { ($0 - r.started) * 1000 })
        case .qemu(let qemu, let kvm):
            return (try Self.timed(Self.qemuArguments(qemu, kvm: kvm, guest: guest), environment: environment, success: Self.qemuDebugExit).ms, nil)
        }
    }

    /// QEMU's status when the tiny guest writes 0xfe to `isa-debug-exit`: (0xfe << 1) | 1, in 8 bits.
    static let qemuDebugExit: Int32 = 253

    /// QEMU's microvm with no devices but what the guest needs (and the one-port exit device),
    /// on KVM whatever it is. A software KVM refuses the host CPU model's ARCH_CAPABILITIES MSR.
    static func qemuArguments(_ qemu: String, kvm: KVMProbeResult.Verdict, guest: String, disk: String? = nil, tap: String? = nil) -> [String] {
        var argv = [qemu, "-M", "microvm,pic=off,pit=on,rtc=off,isa-serial=off", "-accel", "kvm",
                    "-cpu", kvm == .hardware ? "host" : "host,-arch-capabilities",
                    "-m", "\(guestMiB)M", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                    "-device", "isa-debug-exit,iobase=0xf4,iosize=1", "-kernel", QEMUMicrovmBackend.escape(guest)]
        if let disk { argv += QEMUMicrovmBackend.blockDevice(id: "disk0", DiskSpec(path: disk)) }
        if let tap { argv += QEMUMicrovmBackend.netDevice(tap: tap) }
        return argv
    }

    /// mvm-vmm's configuration for a tiny guest in a 128 MiB, one-vCPU machine, written to `path`.
    static func writeConfig(_ path: String, guest: String, disk: String? = nil, tap: String? = nil) throws -> String {
        var c = VMConfiguration()
        c.machineConfig = MachineConfig(vcpuCount: 1, memSizeMib: guestMiB)
        c.bootSource = BootSource(kernelImagePath: guest)
        if let disk { c.drives = [Drive(driveId: "disk0", pathOnHost: disk, isReadOnly: false)] }
        if let tap { c.networkInterfaces = [NetworkInterface(ifaceId: "eth0", hostDevName: tap)] }
        try JSONEncoder().encode(c).write(to: URL(fileURLWithPath: path))
        return path
    }

    /// `count` VMMs, each with an idle 128 MiB guest, a disk of its own and (as root) a tap of its
    /// own: the peak of three samples, a second after the start, of their summed PSS less the
    /// guest RAM mappings, per VMM. With several, the pages of the VMM's binary and libraries
    /// are shared between them, as on a host that runs many.
    func idlePSS(_ vmm: VMM, count: Int, metric: Metric, guest: String, dir: String, environment: [String: String],
                 acceleration: String) throws -> Measurement {
        try Paths.ensureDirectory(dir)
        var taps: [TapDevice] = []
        defer { taps.forEach { $0.remove() } }
        var children: [ChildProcess] = []
        defer {
            children.forEach { $0.signal(SIGTERM) }
            for c in children where c.wait(upTo: 10) == nil { c.signal(SIGKILL); _ = c.wait() }
        }
        for i in 0..<count {
            let tap = getuid() == 0 ? try TapDevice(name: nil, tag: "bench-vmm-\(getpid())-\(i)", persistent: true) : nil
            tap?.close()
            if let tap { taps.append(tap) }
            let ownDisk = dir + "/disk\(i).img"
            guard FileManager.default.createFile(atPath: ownDisk, contents: nil), truncate(ownDisk, 64 << 20) == 0 else {
                throw MicroVMError(.backend, "cannot make the bench's scratch disk \(ownDisk)")
            }
            let argv: [String]
            switch vmm {
            case .direct(let binary):
                let config = try Self.writeConfig(dir + "/idle\(i).json", guest: guest, disk: ownDisk, tap: tap?.name)
                argv = [binary, "--config-file", config, "--console-log", "/dev/null"]
            case .qemu(let qemu, let kvm):
                argv = Self.qemuArguments(qemu, kvm: kvm, guest: guest, disk: ownDisk, tap: tap?.name)
            }
            children.append(try ChildProcess(argv, environment: environment))
        }
        usleep(1_000_000)
        var peak: UInt64 = 0, rss: UInt64 = 0
        for _ in 0..<3 {
            var pss: UInt64 = 0, resident: UInt64 = 0
            for child in children {
                guard let smaps = readWholeText("/proc/\(child.pid)/smaps") else {
                    throw MicroVMError(.backend, "a VMM (pid \(child.pid)) ended before its memory could be read")
                }
                let m = Self.memoryExcludingGuestRAM(smaps, guestBytes: UInt64(Self.guestMiB) << 20)
                pss += m.pss; resident += m.rss
            }
            peak = max(peak, pss); rss = max(rss, resident)
            usleep(200_000)
        }
        let n = Double(count) * 1_048_576
        return Measurement(metric, Double(peak) / n,
                           details: ["acceleration": acceleration, "devices": taps.isEmpty ? "1 disk (no tap: not root)" : "1 disk, 1 tap",
                                     "guest": "tiny PVH, idle in hlt", "vmms": "\(count)", "rss_mib_per_vmm": String(format: "%.2f", Double(rss) / n)])
    }

    /// The summed PSS and RSS of a /proc/PID/smaps text less the guest's RAM, in bytes. The RAM is
    /// a run of adjacent anonymous mappings that add up to exactly `guestBytes`: a VMM that advises
    /// parts of it differently splits it (mvm-vmm keeps its first 2 MiB on small pages). Failing
    /// that, any anonymous mapping at least that large.
    public static func memoryExcludingGuestRAM(_ smaps: String, guestBytes: UInt64) -> (pss: UInt64, rss: UInt64) {
        struct Area { var start: UInt64, end: UInt64, anonymous: Bool, pss: UInt64 = 0, rss: UInt64 = 0 }
        var areas: [Area] = []
        for line in smaps.split(separator: "\n") {
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            guard let first = f.first else { continue }
            if !first.hasSuffix(":"), first.contains("-") {
                let ends = first.split(separator: "-").compactMap { UInt64($0, radix: 16) }
                // An anonymous mapping has no sixth field: no file, no [heap] or [stack].
                if ends.count == 2 { areas.append(Area(start: ends[0], end: ends[1], anonymous: f.count == 5)) }
            } else if f.count >= 2, let kb = UInt64(f[1]), !areas.isEmpty {
                if first == "Pss:" { areas[areas.count - 1].pss = kb * 1024 }
                if first == "Rss:" { areas[areas.count - 1].rss = kb * 1024 }
            }
        }
        var guest = Set<Int>()
        var i = 0
        while i < areas.count {
            guard areas[i].anonymous else { i += 1; continue }
            var j = i
            while j + 1 < areas.count, areas[j + 1].anonymous, areas[j + 1].start == areas[j].end { j += 1 }
            search: for a in i...j {
                var sum: UInt64 = 0
                for b in a...j {
                    sum += areas[b].end - areas[b].start
                    if sum == guestBytes { guest.formUnion(a...b); break search }
                    if sum > guestBytes { break }
                }
            }
            i = j + 1
        }
        if guest.isEmpty {
            guest = Set(areas.indices.filter { areas[$0].anonymous && areas[$0].end - areas[$0].start >= guestBytes })
        }
        var pss: UInt64 = 0, rss: UInt64 = 0
        for (k, a) in areas.enumerated() where !guest.contains(k) {
            pss += a.pss
            rss += a.rss
        }
        return (pss, rss)
    }

    /// Where KVM is real: Linux to init (the start scenario's interval) and a ping round trip to
    /// the host (the network scenario's).
    func linux(_ target: BenchTarget, _ ctx: BenchContext) async throws -> [Measurement] {
        guard BackendCatalog.realKVM.contains(target.record.acceleration), target.backend != nil else {
            let why = "Linux cannot boot under \(target.record.acceleration) here: run in the nested rig"
            return [.unavailable(Self.linuxBoot, why), .unavailable(Self.linuxPing, why)]
        }
        let one = try await ctx.run(target, ["true"], tag: "vmm-boot")
        _ = try requireSuccess(one, "true")
        var boot = try StartLatency.start(one, Self.linuxBoot)
        boot.details["acceleration"] = target.record.acceleration
        var out = [boot]
        let (net, host) = try target.link()
        let r = try await ctx.run(target, ["ping", "-c", "20", "-i", "0.2", "-W", "2", host], tag: "vmm-ping", net: net)
        if let rtt = ToolParsers.pingAverageMilliseconds(try requireSuccess(r, "ping")) {
            out.append(Measurement(Self.linuxPing, rtt, details: ["acceleration": target.record.acceleration]))
        } else {
            out.append(.failed(Self.linuxPing, "ping printed no average: \(r.output.suffix(200))"))
        }
        return out
    }
}
