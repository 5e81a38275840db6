import Foundation
import MicroVMCore
import Host

/// What the allocator may hand out on this host: the online CPUs grouped into cores (SMT siblings)
/// and NUMA nodes, memory and the huge-page pool, less the host reservation.
public struct HostCapacity: Codable, Sendable, Equatable {
    public struct NUMANode: Codable, Sendable, Equatable {
        public var id: Int
        public var cpus: [Int]
        public var memory: ByteCount
        public init(id: Int, cpus: [Int], memory: ByteCount) { self.id = id; self.cpus = cpus; self.memory = memory }
    }
    public struct HugePages: Codable, Sendable, Equatable {
        public var total: Int
        public var free: Int
        public var pageSize: ByteCount
        public init(total: Int, free: Int, pageSize: ByteCount) { self.total = total; self.free = free; self.pageSize = pageSize }
    }

    public var onlineCPUs: [Int]
    /// SMT sibling groups; a CPU without topology information is its own core.
    public var cores: [[Int]]
    public var nodes: [NUMANode]
    public var memoryTotal: ByteCount
    public var hugePages: HugePages
    public var reservedCPUs: [Int]
    public var reservedMemory: ByteCount
    /// Ratio by which shared placements may overcommit memory (1.0 = none).
    public var memoryOvercommit: Double

    public init(onlineCPUs: [Int], cores: [[Int]]? = nil, nodes: [NUMANode]? = nil, memoryTotal: ByteCount,
                hugePages: HugePages = HugePages(total: 0, free: 0, pageSize: .kibibytes(2048)),
                reservedCPUs: [Int] = [], reservedMemory: ByteCount = 0, memoryOvercommit: Double = 1.0) {
        self.onlineCPUs = onlineCPUs.sorted()
        self.cores = cores ?? onlineCPUs.sorted().map { [$0] }
        self.nodes = nodes ?? [NUMANode(id: 0, cpus: onlineCPUs.sorted(), memory: memoryTotal)]
        self.memoryTotal = memoryTotal
        self.hugePages = hugePages
        self.reservedCPUs = reservedCPUs.sorted()
        self.reservedMemory = reservedMemory
        self.memoryOvercommit = max(1.0, memoryOvercommit)
    }

    /// CPUs grants may use: online and not reserved.
    public var grantableCPUs: [Int] {
        let r = Set(reservedCPUs)
        return onlineCPUs.filter { !r.contains($0) }
    }
    /// Ordinary (non-huge-page) memory grants may use.
    public var grantableMemory: ByteCount {
        memoryTotal - reservedMemory - hugePagePool
    }
    public var hugePagePool: ByteCount { ByteCount(UInt64(hugePages.total) * hugePages.pageSize.bytes) }

    /// The NUMA node a CPU belongs to (0 when the host reports none).
    public func node(of cpu: Int) -> Int {
        nodes.first { $0.cpus.contains(cpu) }?.id ?? 0
    }

    /// Reads capacity from /proc and /sys under `roots`, less `reservation`. Reserved CPUs are
    /// `reservation.cpuList` when given, else the highest-numbered online CPUs, so CPU 0 (where
    /// most interrupts land) stays grantable only when nothing is reserved.
    public static func probe(roots: HostRoots = HostRoots(), reservation: HostReservation) throws -> HostCapacity {
        try probe(roots: roots).reserving(reservation)
    }

    /// The whole host as /proc and /sys under `roots` describe it, nothing reserved.
    public static func probe(roots: HostRoots = HostRoots()) throws -> HostCapacity {
        let cpuRoot = roots.sys + "/devices/system/cpu"
        guard let onlineText = read(cpuRoot + "/online") else {
            throw MicroVMError.notFound("cannot read \(cpuRoot)/online: is /sys mounted?")
        }
        let online = try CPUList.parse(onlineText)
        guard !online.isEmpty else { throw MicroVMError.invalidArgument("\(cpuRoot)/online lists no CPUs") }

        var cores: [[Int]] = []
        var seen = Set<Int>()
        for cpu in online where !seen.contains(cpu) {
            let siblings = read("\(cpuRoot)/cpu\(cpu)/topology/thread_siblings_list").flatMap { try? CPUList.parse($0) } ?? [cpu]
            let group = siblings.filter { online.contains($0) && !seen.contains($0) }
            let core = group.contains(cpu) ? group : [cpu]
            core.forEach { seen.insert($0) }
            cores.append(core.sorted())
        }

        let meminfo = parseMeminfo(read(roots.proc + "/meminfo") ?? "")
        guard let total = meminfo["MemTotal"] else {
            throw MicroVMError.notFound("cannot read MemTotal from \(roots.proc)/meminfo: is /proc mounted?")
        }
        let pageSize = meminfo["Hugepagesize"] ?? .kibibytes(2048)
        let huge = HugePages(total: Int(meminfo["HugePages_Total"]?.bytes ?? 0), free: Int(meminfo["HugePages_Free"]?.bytes ?? 0), pageSize: pageSize)

        var nodes: [NUMANode] = []
        let nodeRoot = roots.sys + "/devices/system/node"
        let names = (try? FileManager.default.contentsOfDirectory(atPath: nodeRoot)) ?? []
        for name in names where name.hasPrefix("node") {
            guard let id = Int(name.dropFirst(4)), let list = read("\(nodeRoot)/\(name)/cpulist") else { continue }
            let cpus = ((try? CPUList.parse(list)) ?? []).filter { online.contains($0) }
            let nodeMem = parseMeminfo(read("\(nodeRoot)/\(name)/meminfo") ?? "", nodePrefix: true)["MemTotal"] ?? 0
            nodes.append(NUMANode(id: id, cpus: cpus, memory: nodeMem))
        }
        nodes.sort { $0.id < $1.id }
        if nodes.isEmpty { nodes = [NUMANode(id: 0, cpus: online, memory: total)] }
        return HostCapacity(onlineCPUs: online, cores: cores, nodes: nodes, memoryTotal: total, hugePages: huge,
                            reservedCPUs: [], reservedMemory: 0)
    }

    /// This capacity less `reservation` (which replaces any reservation it had).
    public func reserving(_ reservation: HostReservation) throws -> HostCapacity {
        let online = onlineCPUs, total = memoryTotal
        let reserved: [Int]
        if let list = reservation.cpuList {
            reserved = try CPUList.parse(list)
            if let bad = reserved.first(where: { !online.contains($0) }) {
                throw MicroVMError.invalidArgument("reservation.cpuList names CPU \(bad), which is not online (online: \(CPUList.format(online)))")
            }
        } else {
            guard reservation.cpus < online.count else {
                throw MicroVMError.invalidArgument("reservation.cpus is \(reservation.cpus) but the host has only \(online.count) online CPUs: lower it in config/microvm.yaml")
            }
            reserved = Array(online.sorted().suffix(reservation.cpus))
        }
        guard reservation.memory < total else {
            throw MicroVMError.invalidArgument("reservation.memory \(reservation.memory) is not below the host's \(total): lower it in config/microvm.yaml")
        }
        return HostCapacity(onlineCPUs: online, cores: cores, nodes: nodes, memoryTotal: total, hugePages: hugePages,
                            reservedCPUs: reserved, reservedMemory: reservation.memory,
                            memoryOvercommit: reservation.memoryOvercommit ?? 1.0)
    }

    static func read(_ path: String) -> String? {
        (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// /proc/meminfo ("MemTotal: 123 kB", counts without a unit) or a node's meminfo
    /// ("Node 0 MemTotal: 123 kB").
    static func parseMeminfo(_ text: String, nodePrefix: Bool = false) -> [String: ByteCount] {
        var out: [String: ByteCount] = [:]
        for line in text.split(separator: "\n") {
            var f = line.split(whereSeparator: { $0 == " " || $0 == ":" }).map(String.init)
            if nodePrefix, f.first == "Node" { f.removeFirst(min(2, f.count)) }
            guard f.count >= 2, let n = UInt64(f[1]) else { continue }
            let isKB = f.count >= 3 && f[2].lowercased() == "kb"
            out[f[0]] = isKB ? (n <= UInt64.max >> 10 ? .kibibytes(n) : ByteCount(UInt64.max)) : ByteCount(n)
        }
        return out
    }
}
