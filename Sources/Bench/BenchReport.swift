import Foundation
import MicroVMCore

/// The results file `mvm bench` writes (docs/bench-schema.md). Raw samples are always kept so a
/// later `mvm bench compare` can test them, not just their summaries.
public struct BenchReport: Codable, Sendable {
    public static let currentSchemaVersion = 2

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
        catch { throw MicroVMError(.invalidArgument, "\(source) does not match bench schema version \(currentSchemaVersion) (docs/bench-schema.md)", cause: error) }
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
    /// How repeats were ordered: `interleaved` (repeat N of every backend, then N + 1).
    public var order: String?
    public init(preset: String, repeats: Int, scenarios: [String], profile: String, slice: ResourceSlice, workload: String, guestKernel: String?,
                durations: [String: Double], repeatsByBackend: [String: Int]? = nil, order: String? = nil) {
        self.preset = preset; self.repeats = repeats; self.scenarios = scenarios; self.profile = profile
        self.slice = slice; self.workload = workload; self.guestKernel = guestKernel; self.durations = durations
        self.repeatsByBackend = repeatsByBackend; self.order = order
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
///
/// A failed repeat is never a number: each repeat either gives samples (a success) or a reason
/// (a failure), and the cell gets a summary only when enough repeats succeeded
/// (`hasEnoughSuccesses`). Otherwise it reads `partial` or `failed`, with every reason kept.
public struct Cell: Codable, Sendable, Equatable {
    public enum Status: String, Codable, Sendable {
        /// Enough repeats succeeded: `stats` and `ratioToNative` summarise them.
        case ok
        /// Some repeats succeeded, too few to summarise: samples are kept, no summary.
        case partial
        /// No repeat succeeded.
        case failed
        /// Could not run here (`note` says why).
        case unavailable
    }

    /// The one rule that turns repeats into a summary: more than half of the attempted repeats
    /// succeeded (1 of 1, 2 of 2, 2 of 3, 3 of 4, 3 of 5). Fewer, and the failures could be
    /// hiding the cell's real behaviour: a median of the survivors would read as a result.
    public static func hasEnoughSuccesses(_ successes: Int, of attempts: Int) -> Bool {
        attempts > 0 && successes * 2 > attempts
    }

    /// The status repeats earn: `ok` by the rule, `partial` below it, `failed` with none.
    public static func status(successes: Int, attempts: Int) -> Status {
        if hasEnoughSuccesses(successes, of: attempts) { return .ok }
        return successes > 0 ? .partial : .failed
    }

    /// The discarded first run of a scenario on a backend (caches, image pages, lazily started
    /// daemons): kept to show what it measured, never a sample.
    public struct Warmup: Codable, Sendable, Equatable {
        /// What it measured for this metric (empty when it failed or was skipped).
        public var samples: [Double]
        /// Why it failed, or why there was none (`skipped: …`).
        public var failure: String?
        public init(samples: [Double] = [], failure: String? = nil) { self.samples = samples; self.failure = failure }
    }

    public var scenario: String
    public var metric: String
    public var title: String
    public var unit: String
    public var higherIsBetter: Bool
    public var backend: String
    public var status: Status
    /// Why the cell is unavailable or failed, or a caveat that labels how it was measured.
    public var note: String?
    /// Raw samples of the successful repeats (kept in `partial` cells too, without a summary).
    public var samples: [Double]
    /// The repeat (1-based) each sample came from, same order as `samples`: a repeat of every
    /// backend runs in the same round, so repeat N of a backend and of native are neighbours in time.
    public var sampleRepeats: [Int]
    /// Per-sample observations (same order as `samples`), e.g. whether a victim survived.
    public var details: [[String: String]]
    /// Repeats planned for this cell; a repeat skipped because an earlier one hung counts, as a failure.
    public var attempts: Int
    /// Repeats that gave at least one sample of this metric.
    public var successes: Int
    /// One entry per failed repeat: `repeat N: reason`.
    public var failures: [String]
    public var warmup: Warmup?
    /// Only for `ok` cells.
    public var stats: SampleStats?
    /// Only for `ok` cells whose native cell is `ok`.
    public var ratioToNative: Statistics.Ratio?

    /// `attempts` and `successes` default to one successful repeat per sample (made-up cells);
    /// an `ok` status that the rule does not grant is lowered to `partial` or `failed`.
    public init(scenario: String, metric: String, title: String, unit: String, higherIsBetter: Bool, backend: String,
                status: Status, note: String? = nil, samples: [Double] = [], sampleRepeats: [Int]? = nil, details: [[String: String]] = [],
                attempts: Int? = nil, successes: Int? = nil, failures: [String] = [], warmup: Warmup? = nil) {
        self.scenario = scenario; self.metric = metric; self.title = title; self.unit = unit; self.higherIsBetter = higherIsBetter
        self.backend = backend; self.note = note; self.samples = samples; self.details = details
        self.sampleRepeats = sampleRepeats ?? samples.indices.map { $0 + 1 }
        let succeeded = successes ?? Set(self.sampleRepeats).count
        self.successes = succeeded
        self.attempts = attempts ?? (succeeded + failures.count)
        self.failures = failures; self.warmup = warmup
        self.status = status == .ok ? Self.status(successes: succeeded, attempts: self.attempts) : status
        self.stats = self.status == .ok ? SampleStats(samples) : nil
        self.ratioToNative = nil
    }

    /// One value per successful repeat (the median of that repeat's samples), by repeat: the
    /// unit `mvm bench compare` tests, since samples of one repeat share its moment in time.
    public var perRepeat: [Int: Double] {
        var byRepeat: [Int: [Double]] = [:]
        for (v, r) in zip(samples, sampleRepeats) where v.isFinite { byRepeat[r, default: []].append(v) }
        return byRepeat.mapValues(Statistics.median)
    }
}
