/// How an instance's vCPUs are placed on host CPUs.
public enum Placement: String, Codable, Sendable, CaseIterable {
    /// Whole host CPUs, given to this instance alone (no other grant shares them).
    case dedicated
    /// Pinned to specific host CPUs which other pinned/shared instances may also use.
    case pinned
    /// A shared pool, with a weight and an optional quota.
    case shared

    public init(parsing text: String) throws {
        guard let p = Placement(rawValue: text.lowercased()) else {
            throw MicroVMError.invalidArgument("unknown placement '\(text)': use dedicated, pinned or shared")
        }
        self = p
    }
}

/// A share of the host, as granted by the allocator and enforced by each backend.
public struct ResourceSlice: Codable, Sendable, Hashable {
    public var cpus: Int
    public var placement: Placement
    /// Host CPUs this slice may run on (empty: any).
    public var cpuSet: [Int]
    /// Relative CPU weight (cgroup v2 scale 1...10000, default 100).
    public var cpuWeight: Int
    /// CPU quota in CPUs (e.g. 1.5), nil for no quota.
    public var cpuQuota: Double?
    public var memory: ByteCount
    public var hugePages: Bool
    /// Maximum number of tasks (pids.max), nil for no limit.
    public var pidsLimit: Int?
    /// NUMA node the memory comes from, when the host has several.
    public var numaNode: Int?

    public init(cpus: Int, placement: Placement = .shared, cpuSet: [Int] = [], cpuWeight: Int = 100, cpuQuota: Double? = nil,
                memory: ByteCount, hugePages: Bool = false, pidsLimit: Int? = nil, numaNode: Int? = nil) {
        self.cpus = cpus; self.placement = placement; self.cpuSet = cpuSet; self.cpuWeight = cpuWeight
        self.cpuQuota = cpuQuota; self.memory = memory; self.hugePages = hugePages; self.pidsLimit = pidsLimit; self.numaNode = numaNode
    }

    /// "0-3,6" style list, as cpuset.cpus and libvirt's cpuset attribute write it.
    public var cpuSetList: String { CPUList.format(cpuSet) }
}

/// Linux CPU list syntax ("0-3,6,8-9").
public enum CPUList {
    public static func parse(_ text: String) throws -> [Int] {
        var out: [Int] = []
        for part in text.trimmed().split(separator: ",") {
            let ends = part.split(separator: "-", omittingEmptySubsequences: false)
            if ends.count == 1, let n = Int(ends[0]) { out.append(n) }
            else if ends.count == 2, let a = Int(ends[0]), let b = Int(ends[1]), a <= b { out.append(contentsOf: a...b) }
            else { throw MicroVMError.invalidArgument("'\(text)' is not a CPU list: write e.g. 0-3,6") }
        }
        return out
    }
    public static func format(_ cpus: [Int]) -> String {
        let s = Array(Set(cpus)).sorted()
        var parts: [String] = []
        var i = 0
        while i < s.count {
            var j = i
            while j + 1 < s.count && s[j + 1] == s[j] + 1 { j += 1 }
            parts.append(i == j ? "\(s[i])" : "\(s[i])-\(s[j])")
            i = j + 1
        }
        return parts.joined(separator: ",")
    }
}

import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
