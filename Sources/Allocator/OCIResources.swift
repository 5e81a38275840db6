import MicroVMCore

/// A slice as the OCI runtime spec's `linux.resources` (runc, crun, Docker), field names as in
/// config.json, so a container backend can encode it straight into its spec or convert it.
///
/// Mapping: cpuSet → cpu.cpus, NUMA node → cpu.mems, weight → cpu.shares (cgroup v1 scale,
/// 100 → 1024; runtimes convert shares to v2 weight themselves), quota in CPUs → cpu.quota over a
/// 100 ms cpu.period, memory → memory.limit and memory.swap (equal: no swap), pidsLimit → pids.limit.
public struct OCIResources: Codable, Sendable, Equatable {
    public struct CPU: Codable, Sendable, Equatable {
        public var shares: UInt64?
        public var quota: Int64?
        public var period: UInt64?
        public var cpus: String?
        public var mems: String?
    }
    public struct Memory: Codable, Sendable, Equatable {
        public var limit: Int64?
        public var swap: Int64?
    }
    public struct Pids: Codable, Sendable, Equatable {
        public var limit: Int64
    }
    public var cpu: CPU
    public var memory: Memory
    public var pids: Pids?

    /// An enforcement as config.json says it: the CPU cap always as a quota, the memory limit
    /// with the enforcement's overhead rule applied.
    public init(enforcement e: Enforcement) {
        self.init(slice: e.cgroupSlice)
    }

    public init(slice: ResourceSlice) {
        let period = UInt64(CgroupSet.period)
        cpu = CPU(shares: UInt64(CgroupSet.shares(weight: slice.cpuWeight)),
                  quota: slice.cpuQuota.map { Int64(CgroupSet.quotaMicros($0)) },
                  period: slice.cpuQuota == nil ? nil : period,
                  cpus: slice.cpuSet.isEmpty ? nil : slice.cpuSetList,
                  mems: slice.numaNode.map(String.init))
        let bytes = Int64(clamping: slice.memory.bytes)
        memory = Memory(limit: bytes, swap: bytes)
        pids = slice.pidsLimit.map { Pids(limit: Int64($0)) }
    }
}
