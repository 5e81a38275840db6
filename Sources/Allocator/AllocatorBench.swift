import Foundation
import MicroVMCore

/// How long one placement decision takes against a ledger holding many live grants.
public enum AllocatorBench {
    /// Fills a temporary ledger with `liveGrants` grants on a synthetic 64-CPU, two-node host
    /// (a mix of dedicated, pinned and shared), then times `samples` decisions: the snapshot read
    /// inside an IMMEDIATE transaction plus `Placer.decide`, i.e. everything `allocate` does
    /// except the insert. Returns microseconds.
    public static func placementDecisionTime(liveGrants: Int = 10_000, samples: Int = 200) throws -> (medianMicroseconds: Double, p99: Double) {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mvm-alloc-bench-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        try Paths.ensureDirectory(dir)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let capacity = benchHost()
        let allocator = try Allocator(capacity: capacity, ledgerPath: dir + "/ledger.sqlite", ownerAlive: { _, _ in true })
        try fill(allocator, count: liveGrants)
        let request = SliceRequest(cpus: 2, placement: .pinned, memory: .mebibytes(64), owner: "bench")
        var times: [Double] = []
        for _ in 0..<max(1, samples) {
            let t0 = DispatchTime.now().uptimeNanoseconds
            _ = try allocator.ledger.immediate { db in
                try Placer.decide(request, capacity: capacity, snapshot: try Ledger.snapshot(db))
            }
            times.append(Double(DispatchTime.now().uptimeNanoseconds - t0) / 1000)
        }
        times.sort()
        let p99 = times[min(times.count - 1, Int((Double(times.count) * 0.99).rounded(.up)) - 1)]
        return (times[times.count / 2], p99)
    }

    static func benchHost() -> HostCapacity {
        HostCapacity(onlineCPUs: Array(0..<64), cores: (0..<32).map { [$0, $0 + 32] },
                     nodes: [.init(id: 0, cpus: Array(0..<16) + Array(32..<48), memory: .gibibytes(2048)),
                             .init(id: 1, cpus: Array(16..<32) + Array(48..<64), memory: .gibibytes(2048))],
                     memoryTotal: .gibibytes(4096), reservedMemory: .gibibytes(1))
    }

    /// Inserts the grants in one transaction, as allocations would leave them.
    static func fill(_ allocator: Allocator, count: Int) throws {
        let capacity = allocator.capacity
        try allocator.ledger.immediate { db in
            var snapshot = try Ledger.snapshot(db)
            for i in 0..<count {
                let placement: Placement = i < 16 ? .dedicated : (i % 2 == 0 ? .pinned : .shared)
                let r = SliceRequest(cpus: 1, placement: placement, memory: .mebibytes(16), owner: "bench-\(i)", ownerPID: 1)
                let (slice, huge) = try Placer.decide(r, capacity: capacity, snapshot: snapshot)
                let g = try Ledger.insert(db, request: r, slice: slice, hugePages: huge, pidStart: nil)
                switch placement {
                case .dedicated: slice.cpuSet.forEach { snapshot.dedicated[$0] = g.id }; snapshot.hardMemory += slice.memory.bytes
                case .pinned: slice.cpuSet.forEach { snapshot.pinnedLoad[$0, default: 0] += 1 }; snapshot.hardMemory += slice.memory.bytes
                case .shared: snapshot.sharedMemory += slice.memory.bytes; snapshot.largestShared = max(snapshot.largestShared, 1)
                }
            }
        }
    }
}
