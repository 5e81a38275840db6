import Foundation
import MicroVMCore
import Images
import Host

/// What the isolation probe (images/probe/mvm-audit.c, `/usr/bin/mvm-audit` in the guest image)
/// reports from inside an instance: the kernel it talks to, the processes, devices and host
/// interfaces it sees, and which sensitive system calls it may make.
public struct ProbeReport: Codable, Sendable, Equatable {
    /// The probe output this code reads; a probe of another version is a failed entry.
    public static let supportedVersion = 1

    public struct Kernel: Codable, Sendable, Equatable {
        /// `uname -r` and `uname -v`.
        public var release: String?
        public var version: String?
        public var machine: String?
        /// /proc/sys/kernel/random/boot_id: one value per running kernel, whatever the namespaces.
        public var bootID: String?
    }

    public struct Processes: Codable, Sendable, Equatable {
        public var selfPID: Int
        /// Entries /proc/[0-9]* (-1: /proc unreadable).
        public var visible: Int
        /// /proc/1/comm: the instance's own init, or the host's.
        public var pid1: String?
        /// readlink /proc/self/ns/pid.
        public var pidNamespace: String?
    }

    public struct Identity: Codable, Sendable, Equatable {
        public var uid: Int
        /// /proc/self/status fields, verbatim: CapEff in hex, Seccomp 0/1/2, NoNewPrivs 0/1.
        public var capEff: String?
        public var seccomp: String?
        public var noNewPrivs: String?
    }

    public struct Devices: Codable, Sendable, Equatable {
        /// Entries in /dev (-1: unreadable).
        public var count: Int
        /// Block devices in /dev, comma-separated.
        public var block: String
        /// Device name → `absent`, `openable` (read-only open succeeded) or `present, open: ERRNO`.
        public var sensitive: [String: String]
    }

    public struct HostInterfaces: Codable, Sendable, Equatable {
        /// `readable`, `empty (masked)`, `denied (ERRNO)` or `absent`.
        public var procKcore: String?
        /// `N entries`, `empty`, `denied (ERRNO)` or `absent`.
        public var sysFirmware: String?
        public var cgroupRoot: String?
        /// The names at /sys/fs/cgroup, comma-separated.
        public var cgroupEntries: String?
        /// Cgroup directories below /sys/fs/cgroup, three levels deep.
        public var cgroupDirs: Int
        /// The first line of /proc/self/cgroup.
        public var selfCgroup: String?
    }

    public var probe: String
    public var probeVersion: Int
    public var kernel: Kernel
    public var processes: Processes
    public var identity: Identity
    public var devices: Devices
    public var host: HostInterfaces
    /// System call → `allowed`, `denied (ERRNO)`, `not implemented (ENOSYS)` or `not attempted (why)`.
    public var syscalls: [String: String]

    /// The system calls the probe tries, in report order, with what exactly it tries.
    public static let syscallChecks: [(key: String, title: String)] = [
        ("mount", "mount (tmpfs on a fresh directory)"),
        ("ptrace", "ptrace (PTRACE_TRACEME, in a child)"),
        ("bpf", "bpf (BPF_PROG_LOAD socket filter)"),
        ("perf_event_open", "perf_event_open (own task clock)"),
        ("add_key", "add_key (process keyring)"),
        ("userfaultfd", "userfaultfd"),
        ("io_uring_setup", "io_uring_setup"),
        ("unshare_user", "unshare(CLONE_NEWUSER), in a child"),
    ]

    /// The devices the probe tries to open, in report order.
    public static let sensitiveDevices = ["kvm", "mem", "kmem", "port", "kmsg", "sda", "nvme0n1", "vda", "vdb"]

    /// Why a run's output holds no usable probe report.
    public struct Failure: Error, Sendable, Equatable, CustomStringConvertible {
        public var reason: String
        public var description: String { reason }
    }

    /// Finds the probe's JSON line in an instance's output (a VM's console or a container's merged
    /// streams may carry other lines) and decodes it. Garbage or truncated output is a `Failure`
    /// that says what was seen, never a trap.
    public static func parse(_ output: String) -> Result<ProbeReport, Failure> {
        // `isNewline`: a serial console's "\r\n" is one Character, equal to neither "\r" nor "\n".
        let lines = output.split(whereSeparator: \.isNewline)
        guard let line = lines.last(where: { $0.hasPrefix("{") && $0.contains("\"probe\":\"mvm-audit\"") }) else {
            return .failure(Failure(reason: "no probe output in \(output.utf8.count) bytes: \(tail(output))"))
        }
        let report: ProbeReport
        do { report = try JSONDecoder().decode(ProbeReport.self, from: Data(line.utf8)) }
        catch { return .failure(Failure(reason: "probe output is truncated or malformed (\(decodingSummary(error))): \(tail(String(line)))")) }
        guard report.probeVersion == supportedVersion else {
            return .failure(Failure(reason: "probe version \(report.probeVersion), this mvm reads \(supportedVersion): rebuild the image with `mvm image build --force`"))
        }
        return .success(report)
    }

    static func tail(_ s: String) -> String {
        let t = s.trimmingCharacters(in: .whitespacesAndNewlines)
        return t.isEmpty ? "(empty)" : "…" + String(t.suffix(200))
    }

    static func decodingSummary(_ error: any Error) -> String {
        switch error {
        case DecodingError.keyNotFound(let k, _): return "missing '\(k.stringValue)'"
        case DecodingError.typeMismatch(_, let c), DecodingError.valueNotFound(_, let c):
            return "bad value at '\(c.codingPath.map(\.stringValue).joined(separator: "."))'"
        case DecodingError.dataCorrupted: return "not JSON"
        default: return "\(error)"
        }
    }
}

/// The host the bench runs on, as the probe would see it there: what each instance is compared with.
public struct AuditHost: Codable, Sendable, Equatable {
    public var release: String?
    public var version: String?
    public var bootID: String?
    public var pidNamespace: String?

    public init(release: String?, version: String?, bootID: String?, pidNamespace: String?) {
        self.release = release; self.version = version; self.bootID = bootID; self.pidNamespace = pidNamespace
    }

    /// This process's own view: uname's release and version come from the same kernel files.
    public static func current() -> AuditHost {
        func line(_ path: String) -> String? {
            (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        return AuditHost(release: line("/proc/sys/kernel/osrelease"), version: line("/proc/sys/kernel/version"),
                         bootID: line("/proc/sys/kernel/random/boot_id"),
                         pidNamespace: try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/ns/pid"))
    }
}

/// One backend's audit: the probe's report and what it means against the host.
public struct AuditEntry: Codable, Sendable, Equatable {
    public enum Status: String, Codable, Sendable { case ok, unavailable, failed }

    public var backend: String
    public var status: Status
    /// Why the entry is unavailable or failed.
    public var note: String?
    public var probe: ProbeReport?
    /// Whether the instance talks to the host's kernel: the same boot ID (or, without one, the
    /// same uname release and version).
    public var sharesHostKernel: Bool?
    /// Whether it sees the host's processes: the host's kernel and the host's PID namespace.
    /// (Every kernel's initial PID namespace has the same inode number, so the namespace alone
    /// cannot tell a VM's from the host's.)
    public var seesHostPIDs: Bool?

    public init(backend: String, status: Status, note: String? = nil, probe: ProbeReport? = nil) {
        self.backend = backend; self.status = status; self.note = note; self.probe = probe
    }

    /// The entry for one instance run's output.
    public static func from(backend: String, output: String, exitStatus: Int32, host: AuditHost) -> AuditEntry {
        switch ProbeReport.parse(output) {
        case .failure(let f):
            return AuditEntry(backend: backend, status: .failed, note: "probe failed (exit status \(exitStatus)): \(f.reason)")
        case .success(let p):
            var e = AuditEntry(backend: backend, status: .ok, note: exitStatus == 0 ? nil : "probe exited with status \(exitStatus)", probe: p)
            let shares: Bool
            if let mine = p.kernel.bootID, let theirs = host.bootID { shares = mine == theirs }
            else { shares = p.kernel.release == host.release && p.kernel.version == host.version }
            e.sharesHostKernel = shares
            e.seesHostPIDs = shares && p.processes.pidNamespace != nil && p.processes.pidNamespace == host.pidNamespace
            return e
        }
    }
}

/// The audit as `results.json` keeps it (`audit`, docs/bench-schema.md).
public struct AuditRecord: Codable, Sendable, Equatable {
    public var host: AuditHost
    public var entries: [AuditEntry]
    public init(host: AuditHost, entries: [AuditEntry]) { self.host = host; self.entries = entries }

    public func entry(_ backend: String) -> AuditEntry? { entries.first { $0.backend == backend } }
}

/// Runs the isolation probe once per backend, from inside an instance made as the bench makes
/// them (same workload tree, same slice), and records what it saw beside the host's own view.
///
/// ```swift
/// let audit = await IsolationAudit(context: ctx).run(targets)
/// print(MarkdownReport.renderAudit(audit))
/// ```
public struct IsolationAudit: Sendable {
    public static let command = [RootfsBuilder.probePath]
    public var context: BenchContext
    /// Which of this process's new descendants a hung probe run may have left (as `BenchPlan`).
    public var leftoverFilter: @Sendable (Int32) -> Bool = { _ in true }
    let progress: @Sendable (String) -> Void

    public init(context: BenchContext, progress: @escaping @Sendable (String) -> Void = { _ in }) {
        self.context = context; self.progress = progress
    }

    /// When set, each target the containerd scenario measures is audited once more, in a pod
    /// that containerd starts with the target's runtime (`containerd+runc`, `+runsc`, `+mvm-runtime`).
    public var containerd: ContainerdScenario?

    public func run(_ targets: [BenchTarget], host: AuditHost = .current()) async -> AuditRecord {
        var entries: [AuditEntry] = []
        for t in targets { entries.append(await audit(t, host: host)) }
        if let containerd {
            let mine = ContainerdScenario.targets(kvm: HostProfile.current().kvm.verdict)
            for t in targets where t.backend != nil && mine.contains(t.name) {
                if let why = probeMissing { entries.append(AuditEntry(backend: ContainerdScenario.auditName(t.name), status: .unavailable, note: why)); continue }
                progress("[bench] isolation audit on \(t.name) through containerd")
                entries.append(containerd.audit(t, context, host: host))
            }
        }
        return AuditRecord(host: host, entries: entries)
    }

    /// Why the workload cannot run the probe (nil: it can). VMs boot the same image the tree
    /// belongs to, so the tree answers for them too.
    public var probeMissing: String? {
        let tree = context.workload.rootfsTree
        guard tree != "/" else { return "the probe is built into the guest image; the host workload (--workload host) has none" }
        guard FileManager.default.isExecutableFile(atPath: tree + RootfsBuilder.probePath) else {
            return "the workload (\(context.workload.source)) has no \(RootfsBuilder.probePath): the default guest image has it (an older one gets it from `mvm image build --force`)"
        }
        return nil
    }

    public func audit(_ target: BenchTarget, host: AuditHost = .current()) async -> AuditEntry {
        guard target.backend != nil else {
            return AuditEntry(backend: target.name, status: .unavailable, note: target.record.unavailableReason ?? "backend not available")
        }
        if let why = probeMissing { return AuditEntry(backend: target.name, status: .unavailable, note: why) }
        progress("[bench] isolation audit on \(target.name)")
        let ctx = context
        do {
            let r = try await Watchdog.run(seconds: ctx.durations.instanceTimeout + ctx.durations.cellMargin,
                                           cleanup: { await BenchRunner.stopLeftovers(target) }, owned: leftoverFilter) {
                try await ctx.run(target, Self.command, tag: "audit")
            }
            return AuditEntry.from(backend: target.name, output: r.output, exitStatus: r.exitStatus, host: host)
        } catch let u as ScenarioUnavailable {
            return AuditEntry(backend: target.name, status: .unavailable, note: u.reason)
        } catch {
            return AuditEntry(backend: target.name, status: .failed, note: "probe failed: \(error)")
        }
    }
}
