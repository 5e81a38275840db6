import Foundation
import MicroVMCore

/// The results file `mvm bench` writes (docs/bench-schema.md). Raw samples are always kept so a
/// later `mvm bench compare` can test them, not just their summaries.
public struct BenchReport: Codable, Sendable {
    public static let currentSchemaVersion = 1

    public var schemaVersion: Int
    public var createdAt: Date
    public var host: HostRecord
    public var config: RunConfigRecord
    public var backends: [BackendRecord]
    public var cells: [Cell]
    /// The isolation audit, one probe run per backend (absent in files written before it existed).
    public var audit: AuditRecord?

    public init(createdAt: Date = Date(), host: HostRecord, config: RunConfigRecord, backends: [BackendRecord], cells: [Cell]) {
        self.schemaVersion = Self.currentSchemaVersion
        self.createdAt = createdAt; self.host = host; self.config = config; self.backends = backends; self.cells = cells
    }

    /// Decodes and refuses a schema it does not know, rather than misreading it.
    public static func decode(_ data: Data, source: String = "results") throws -> BenchReport {
        struct Version: Decodable { var schemaVersion: Int? }
        let version: Int?
        do { version = try JSONDecoder().decode(Version.self, from: data).schemaVersion }
        catch { throw MicroVMError(.invalidArgument, "\(source) is not a MicroVM bench results file (not JSON)", cause: error) }
        guard version == currentSchemaVersion else {
            throw MicroVMError.invalidArgument("\(source) has schemaVersion \(version.map(String.init) ?? "none"); this mvm reads version \(currentSchemaVersion): rerun `mvm bench` with this version")
        }
        let d = JSONDecoder()
        d.dateDecodingStrategy = .iso8601
        do { return try d.decode(BenchReport.self, from: data) }
        catch { throw MicroVMError(.invalidArgument, "\(source) does not match bench schema version 1 (docs/bench-schema.md)", cause: error) }
    }

    public static func load(path: String) throws -> BenchReport {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw MicroVMError.notFound("results file '\(path)' does not exist or cannot be read")
        }
        return try decode(data, source: path)
    }

    public func encoded() throws -> Data {
        let e = JSONEncoder()
        e.outputFormatting = [.prettyPrinted, .sortedKeys]
        e.dateEncodingStrategy = .iso8601
        return try e.encode(self)
    }

    public func cell(scenario: String, metric: String, backend: String) -> Cell? {
        cells.first { $0.scenario == scenario && $0.metric == metric && $0.backend == backend }
    }

    /// Metrics in the order they were first measured.
    public var metrics: [(scenario: String, metric: String)] {
        var seen = Set<String>(), out: [(String, String)] = []
        for c in cells where seen.insert(c.scenario + "\u{0}" + c.metric).inserted { out.append((c.scenario, c.metric)) }
        return out
    }
}

/// The machine the numbers come from.
public struct HostRecord: Codable, Sendable, Equatable {
    public var cpuModel: String
    public var cores: Int
    public var kernel: String
    public var memory: ByteCount
    public var kvm: String
    public var kvmReason: String
    public var cgroupMode: String
    public init(cpuModel: String, cores: Int, kernel: String, memory: ByteCount, kvm: String, kvmReason: String, cgroupMode: String) {
        self.cpuModel = cpuModel; self.cores = cores; self.kernel = kernel; self.memory = memory
        self.kvm = kvm; self.kvmReason = kvmReason; self.cgroupMode = cgroupMode
    }
}

/// How the run was configured: the same slice and workload for every backend.
public struct RunConfigRecord: Codable, Sendable, Equatable {
    public var preset: String
    public var repeats: Int
    public var scenarios: [String]
    public var profile: String
    public var slice: ResourceSlice
    /// Where the workload binaries come from (the image's rootfs, or the host's own tree).
    public var workload: String
    public var guestKernel: String?
    public var durations: [String: Double]
    /// Repeats each backend really got (emulated VMs may get fewer in `--quick`).
    public var repeatsByBackend: [String: Int]?
    public init(preset: String, repeats: Int, scenarios: [String], profile: String, slice: ResourceSlice, workload: String, guestKernel: String?,
                durations: [String: Double], repeatsByBackend: [String: Int]? = nil) {
        self.preset = preset; self.repeats = repeats; self.scenarios = scenarios; self.profile = profile
        self.slice = slice; self.workload = workload; self.guestKernel = guestKernel; self.durations = durations
        self.repeatsByBackend = repeatsByBackend
    }
}

/// One backend as it was (or could not be) used in this run.
public struct BackendRecord: Codable, Sendable, Equatable {
    public var name: String
    public var mode: RunMode
    /// `hardware KVM`, `emulated KVM`, `TCG` or `none`: what the numbers really measured.
    public var acceleration: String
    public var available: Bool
    public var unavailableReason: String?
    public var versions: [String: String]
    /// The slices its instances got, described, with how many instances got each: `granted …`
    /// from the allocator, or a `shared` fallback with the allocator's refusal.
    public var slices: [String: Int]?
    public init(name: String, mode: RunMode, acceleration: String, available: Bool, unavailableReason: String? = nil, versions: [String: String] = [:]) {
        self.name = name; self.mode = mode; self.acceleration = acceleration; self.available = available
        self.unavailableReason = unavailableReason; self.versions = versions
    }
    /// `unavailable: <reason>` or the acceleration, for tables.
    public var label: String { available ? "\(name) (\(acceleration))" : "\(name): unavailable: \(unavailableReason ?? "unknown")" }
}

/// One scenario metric on one backend.
public struct Cell: Codable, Sendable, Equatable {
    public enum Status: String, Codable, Sendable { case ok, unavailable, failed }

    public var scenario: String
    public var metric: String
    public var title: String
    public var unit: String
    public var higherIsBetter: Bool
    public var backend: String
    public var status: Status
    /// Why the cell is unavailable or failed, or a caveat that labels how it was measured.
    public var note: String?
    public var samples: [Double]
    /// Per-sample observations (same order as `samples`), e.g. whether a victim survived.
    public var details: [[String: String]]
    public var errors: [String]
    public var stats: SampleStats?
    public var ratioToNative: Statistics.Ratio?

    public init(scenario: String, metric: String, title: String, unit: String, higherIsBetter: Bool, backend: String,
                status: Status, note: String? = nil, samples: [Double] = [], details: [[String: String]] = [], errors: [String] = []) {
        self.scenario = scenario; self.metric = metric; self.title = title; self.unit = unit; self.higherIsBetter = higherIsBetter
        self.backend = backend; self.status = status; self.note = note; self.samples = samples; self.details = details
        self.errors = errors; self.stats = SampleStats(samples); self.ratioToNative = nil
    }
}
