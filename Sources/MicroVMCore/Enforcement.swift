/// A granted slice as every backend enforces it: one value, rendered as cgroup files (the direct
/// VMM), OCI `linux.resources` (runc, crun, runsc), `docker run` flags and libvirt
/// `<cputune>`/`<memtune>`/`<numatune>`/`<memoryBacking>` (hosted). The renderings must mean the
/// same thing; a table test checks that they do, placement by placement.
///
/// The rules, the same in every mode:
/// - **CPU work**: a slice of N CPUs is at most N CPUs of work (`cpuQuota`, or the slice's own
///   smaller quota), in every placement. Shared placement adds a weight; it does not lift the cap.
/// - **Where**: `cpuSet` bounds every thread; `vcpuPins` gives each vCPU its host CPUs — one CPU
///   each for dedicated and pinned slices, the whole set for shared ones.
/// - **Memory**: the instance sees `memory` (a VM's RAM, a container's limit). The cgroup limit is
///   `memory + overhead`, where the overhead is the VMM's or QEMU's own memory
///   (`Enforcement.overhead(for:)`): 0 for containers (runc and crun stay outside the container's
///   cgroup; gVisor's sandbox does not, and shares the limit with the workload), 64 MiB for the
///   direct VMM, 256 MiB for QEMU. No swap beyond it.
/// - **pids**: the slice's limit, on the container's processes or the VMM's threads (runsc adds
///   an allowance for its sandbox's own tasks).
/// - **Huge pages**: a VM's RAM is backed by hugetlbfs pages; containers refuse them.
/// - **NUMA**: a slice placed on a node takes its memory there (cpuset.mems, `numatune`).
public struct Enforcement: Codable, Sendable, Hashable {
    public var cpus: Int
    public var placement: Placement
    /// Host CPUs every thread of the instance may run on (empty: any).
    public var cpuSet: [Int]
    /// vCPU i → the host CPUs it may run on (empty: no pinning).
    public var vcpuPins: [[Int]]
    /// At most this many CPUs of work, always set.
    public var cpuQuota: Double
    /// Relative weight (1...10000, 100 = default), cgroup v2 scale.
    public var cpuWeight: Int
    /// What the instance sees: guest RAM, or the container's limit.
    public var memory: ByteCount
    /// The VMM's or runtime's own memory, on top of `memory` in the cgroup limit.
    public var overhead: ByteCount
    public var pidsLimit: Int?
    public var hugePages: Bool
    public var numaNode: Int?

    /// The memory limit of the cgroup that holds the instance.
    public var memoryLimit: ByteCount { memory + overhead }

    /// The CFS period every rendering uses, in microseconds.
    public static let period = 100_000

    /// The quota in microseconds per `period`.
    public var quotaMicros: Int { Self.quotaMicros(cpuQuota) }

    /// cgroup v1 cpu.shares (libvirt's `<shares>`, Docker's `--cpu-shares`) for a v2-style
    /// weight: 100 ↔ 1024, the kernel's default.
    public static func shares(weight: Int) -> Int { max(2, min(262_144, weight * 1024 / 100)) }

    /// `cpus` CPUs of work as microseconds per `period` (at least 1 ms, the kernel's minimum).
    public static func quotaMicros(_ cpus: Double) -> Int { max(1000, Int((cpus * Double(period)).rounded())) }

    /// The VMM's or runtime's allowance on top of what the instance sees (see the type's rules).
    public static func overhead(for mode: RunMode) -> ByteCount {
        switch mode {
        case .container, .native: return ByteCount(0)
        case .direct: return .mebibytes(64)
        case .hosted: return .mebibytes(256)
        }
    }

    public init(cpus: Int, placement: Placement, cpuSet: [Int], vcpuPins: [[Int]], cpuQuota: Double, cpuWeight: Int, memory: ByteCount,
                overhead: ByteCount, pidsLimit: Int?, hugePages: Bool, numaNode: Int?) {
        self.cpus = cpus; self.placement = placement; self.cpuSet = cpuSet; self.vcpuPins = vcpuPins; self.cpuQuota = cpuQuota
        self.cpuWeight = cpuWeight; self.memory = memory; self.overhead = overhead; self.pidsLimit = pidsLimit
        self.hugePages = hugePages; self.numaNode = numaNode
    }

    /// The enforcement of a granted slice in `mode`.
    public init(slice s: ResourceSlice, mode: RunMode) {
        let set = Array(Set(s.cpuSet)).sorted()
        let pins: [[Int]]
        if set.isEmpty {
            pins = []
        } else if s.placement == .shared {
            pins = Array(repeating: set, count: s.cpus)
        } else {
            pins = (0..<s.cpus).map { [set[$0 % set.count]] }
        }
        let cap = Double(s.cpus)
        self.init(cpus: s.cpus, placement: s.placement, cpuSet: set, vcpuPins: pins, cpuQuota: min(cap, s.cpuQuota ?? cap),
                  cpuWeight: s.cpuWeight, memory: s.memory, overhead: Self.overhead(for: mode), pidsLimit: s.pidsLimit,
                  hugePages: s.hugePages, numaNode: s.numaNode)
    }

    /// The slice a cgroup or OCI rendering writes: the quota always set, memory the cgroup's limit.
    public var cgroupSlice: ResourceSlice {
        ResourceSlice(cpus: cpus, placement: placement, cpuSet: cpuSet, cpuWeight: cpuWeight, cpuQuota: cpuQuota, memory: memoryLimit,
                      hugePages: hugePages, pidsLimit: pidsLimit, numaNode: numaNode)
    }

    /// "1 CPU of work on 0-1 (shared, weight 100), 256M (+64M VMM), pids 512" for logs and errors.
    public var summary: String {
        var s = cFormat("%g", cpuQuota) + " CPU\(cpuQuota == 1 ? "" : "s") of work"
        if !cpuSet.isEmpty { s += " on \(CPUList.format(cpuSet))" }
        s += " (\(placement.rawValue), weight \(cpuWeight)), \(memory)"
        if overhead.bytes > 0 { s += " (+\(overhead) overhead)" }
        if let p = pidsLimit { s += ", pids \(p)" }
        if hugePages { s += ", huge pages" }
        if let n = numaNode { s += ", NUMA node \(n)" }
        return s
    }
}
