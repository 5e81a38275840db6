import Foundation
import Testing
import PropertyBased
import MicroVMCore
@testable import Allocator

/// Random sequences of allocations, releases and owner deaths against a real ledger never
/// over-commit the host, and releasing everything restores the starting state.
@Suite(.serialized, .timeLimit(.minutes(5))) struct PropertyTests {
    static let host = HostCapacity(onlineCPUs: Array(0...7), cores: [[0, 4], [1, 5], [2, 6], [3, 7]],
                                   nodes: [.init(id: 0, cpus: [0, 1, 4, 5], memory: .gibibytes(6)),
                                           .init(id: 1, cpus: [2, 3, 6, 7], memory: .gibibytes(6))],
                                   memoryTotal: .gibibytes(12), hugePages: .init(total: 512, free: 512, pageSize: .kibibytes(2048)),
                                   reservedCPUs: [7], reservedMemory: .gibibytes(1), memoryOvercommit: 1.5)

    enum Op: CustomStringConvertible {
        case allocate(SliceRequest)
        case release(Int)
        case kill(Int32)

        /// Decodes one generated number, so shrinking numbers shrinks operations.
        init(_ n: Int) {
            let placements: [Placement] = [.dedicated, .pinned, .shared]
            switch n % 5 {
            case 0, 1, 2:
                let v = n / 5
                let owner = Int32(1000 + v % 6)
                self = .allocate(SliceRequest(cpus: 1 + v % 4, placement: placements[(v / 4) % 3],
                                              memory: .mebibytes(UInt64(64 << ((v / 12) % 6))), hugePages: (v / 72) % 5 == 0,
                                              owner: "owner-\(owner)", ownerPID: owner))
            case 3: self = .release(n / 5)
            default: self = .kill(Int32(1000 + (n / 5) % 6))
            }
        }
        var description: String {
            switch self {
            case .allocate(let r): "allocate \(r.cpus) \(r.placement.rawValue) \(r.memory)\(r.hugePages ? " huge" : "") pid \(r.ownerPID ?? 0)"
            case .release(let i): "release #\(i)"
            case .kill(let p): "kill \(p)"
            }
        }
    }

    /// The invariants over the ledger's live grants.
    static func check(_ grants: [Grant], _ c: HostCapacity) {
        let grantable = Set(c.grantableCPUs)
        var dedicated = Set<Int>()
        for g in grants {
            #expect(Set(g.slice.cpuSet).isSubset(of: grantable), "grant #\(g.id) on \(g.slice.cpuSetList) leaves the grantable CPUs")
            #expect(g.slice.cpuSet.count >= g.slice.cpus, "grant #\(g.id) has fewer CPUs than it asked for")
            if g.slice.placement == .dedicated {
                #expect(dedicated.isDisjoint(with: g.slice.cpuSet), "dedicated CPUs \(g.slice.cpuSetList) granted twice")
                dedicated.formUnion(g.slice.cpuSet)
            }
        }
        for g in grants where g.slice.placement != .dedicated {
            #expect(dedicated.isDisjoint(with: g.slice.cpuSet), "\(g.slice.placement) grant #\(g.id) shares a dedicated CPU")
        }
        let plain = grants.filter { !$0.slice.hugePages }
        let hard = plain.filter { $0.slice.placement != .shared }.reduce(0.0) { $0 + Double($1.slice.memory.bytes) }
        let shared = plain.filter { $0.slice.placement == .shared }.reduce(0.0) { $0 + Double($1.slice.memory.bytes) }
        #expect(hard + shared / c.memoryOvercommit <= Double(c.grantableMemory.bytes) + 1, "memory over-committed")
        #expect(grants.reduce(0) { $0 + $1.hugePageCount } <= c.hugePages.total, "huge pages over-committed")
        for g in grants where g.slice.placement == .dedicated {
            if let node = g.slice.numaNode {
                #expect(Set(g.slice.cpuSet.map(c.node(of:))) == [node], "grant #\(g.id) on node \(node) has CPUs elsewhere")
            }
        }
    }

    @Test func noSequenceOverCommitsAndReleasingAllRestoresTheStart() async throws {
        await propertyCheck(count: 25, input: Gen.int(in: 0...1_000_000).array(of: 1...30)) { numbers in
            let dead = DeadSet()
            let (a, dir) = try Fixture.allocator(Self.host, dead: dead)
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let start = try a.usage()
            for op in numbers.map(Op.init) {
                switch op {
                case .allocate(let r):
                    do {
                        let g = try a.allocate(r)
                        #expect(g.slice.cpus == r.cpus && g.slice.memory == r.memory)
                    } catch let e as MicroVMError {
                        #expect(e.code == .insufficientResources || e.code == .invalidArgument, "\(op): \(e)")
                    }
                case .release(let i):
                    let live = try a.grants()
                    if !live.isEmpty { #expect(try a.release(live[i % live.count].id) != nil) }
                case .kill(let pid):
                    dead.insert(pid)
                }
                Self.check(try a.grants(), Self.host)
            }
            let reclaimed = try a.reclaimDead()
            let left = try a.grants()
            #expect(!left.contains { g in g.pid.map(dead.contains) ?? false }, "a dead owner's grant survived reclaim")
            #expect(reclaimed.allSatisfy { g in g.pid.map(dead.contains) ?? false })
            for g in left { try a.release(g.id) }
            #expect(try a.usage() == start)
            #expect(try a.grants().isEmpty)
        }
    }

    /// Owners (`mvm run`) and holders (the VMM, QEMU, a container's init) die in any order: a
    /// grant whose owner or holder still lives is never reclaimed, so what running instances
    /// really use is always in the ledger, which never exceeds the host.
    @Test func noSequenceOfKillsFreesWhatAHolderStillUses() async throws {
        await propertyCheck(count: 25, input: Gen.int(in: 0...1_000_000).array(of: 1...40)) { numbers in
            let dead = DeadSet()
            let (a, dir) = try Fixture.allocator(Self.host, dead: dead)
            defer { try? FileManager.default.removeItem(atPath: dir) }
            var holders: [Int64: Int32] = [:]
            var granted: [Grant] = []
            for n in numbers {
                let v = n / 4
                switch n % 4 {
                case 0:
                    let owner = Int32(1000 + v % 6)
                    if let g = try? a.allocate(SliceRequest(cpus: 1 + v % 3, placement: [.dedicated, .pinned, .shared][(v / 3) % 3],
                                                            memory: .mebibytes(UInt64(256 << (v % 4))), owner: "o\(owner)", ownerPID: owner)) {
                        granted.append(g)
                    }
                case 1:
                    let live = try a.grants()
                    if !live.isEmpty {
                        let g = live[v % live.count], holder = Int32(5000 + v % 6)
                        try a.hold(g.id, pid: holder, what: "vmm")
                        holders[g.id] = holder
                    }
                case 2: dead.insert(Int32((v % 2 == 0 ? 1000 : 5000) + (v / 2) % 6))
                default: _ = try a.reclaimDead()
                }
                let live = Set(try a.grants().map(\.id))
                for g in granted where !live.contains(g.id) {
                    let ownerAlive = !dead.contains(g.pid ?? 0)
                    let holderAlive = holders[g.id].map { !dead.contains($0) } ?? false
                    #expect(!ownerAlive && !holderAlive, "grant #\(g.id) was reclaimed while its owner or holder lives")
                }
                Self.check(try a.grants(), Self.host)
            }
            // Everything dead: everything comes back.
            for p in 1000..<1006 { dead.insert(Int32(p)) }
            for p in 5000..<5006 { dead.insert(Int32(p)) }
            _ = try a.reclaimDead()
            #expect(try a.grants().isEmpty)
        }
    }

    @Test func aHeldGrantOutlivesItsOwnerUntilTheHolderGoes() throws {
        let dead = DeadSet()
        let (a, dir) = try Fixture.allocator(Self.host, dead: dead)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let g = try a.allocate(SliceRequest(cpus: 2, placement: .dedicated, memory: .gibibytes(1), owner: "vm", ownerPID: 1001))
        try a.hold(g.id, pid: 5001, what: "mvm-vmm")
        #expect(try a.grants().first?.holder == Grant.Holder(pid: 5001, startTime: nil, what: "mvm-vmm"))
        dead.insert(1001)
        #expect(try a.reclaimDead().isEmpty, "the VMM still holds the CPUs and memory")
        #expect(try a.grants().map(\.id) == [g.id])
        dead.insert(5001)
        #expect(try a.reclaimDead().map(\.id) == [g.id])
        let events = try a.events()
        #expect(events.contains { $0.kind == "hold" && $0.detail.contains("mvm-vmm pid 5001") })
        #expect(events.contains { $0.kind == "reclaim" && $0.detail.contains("its holder, mvm-vmm pid 5001, too") })
        // A holder that has already ended is not recorded.
        let h = try a.allocate(SliceRequest(cpus: 1, memory: .mebibytes(64), owner: "c", ownerPID: 1002))
        dead.insert(5002)
        try a.hold(h.id, pid: 5002, what: "runc container init")
        #expect(try a.grants().first { $0.id == h.id }?.holder == nil)
    }

    @Test func deadOwnersAreReclaimedByTheNextAllocation() async throws {
        await propertyCheck(count: 20, input: Gen.int(in: 1...7), Gen.int(in: 0...6)) { holders, deaths in
            let dead = DeadSet()
            let (a, dir) = try Fixture.allocator(Self.host, dead: dead)
            defer { try? FileManager.default.removeItem(atPath: dir) }
            for i in 0..<holders {
                try a.allocate(SliceRequest(cpus: 1, placement: .dedicated, memory: .mebibytes(64), owner: "h\(i)", ownerPID: Int32(2000 + i)))
            }
            let killed = min(deaths, holders)
            for i in 0..<killed { dead.insert(Int32(2000 + i)) }
            // The host is full of dedicated grants when holders == 7; the dead ones' CPUs come back.
            let want = max(1, killed)
            let r = SliceRequest(cpus: want, placement: .dedicated, memory: .mebibytes(64), owner: "new", ownerPID: 3000)
            if 7 - holders + killed >= want {
                let g = try a.allocate(r)
                #expect(g.slice.cpus == want)
                #expect(try a.grants().filter { $0.owner.hasPrefix("h") }.count == holders - killed)
                #expect(try a.events().filter { $0.kind == "reclaim" }.count == killed)
            } else {
                #expect(throws: MicroVMError.self) { try a.allocate(r) }
            }
        }
    }
}
