import Foundation
import Testing
import MicroVMCore
@testable import Allocator

@Suite struct PlacementTests {
    /// Two NUMA nodes, four cores of two SMT threads each: node 0 = cores {0,4} {1,5}, node 1 = {2,6} {3,7}.
    static let twoNode = HostCapacity(onlineCPUs: Array(0...7), cores: [[0, 4], [1, 5], [2, 6], [3, 7]],
                                      nodes: [.init(id: 0, cpus: [0, 1, 4, 5], memory: .gibibytes(8)),
                                              .init(id: 1, cpus: [2, 3, 6, 7], memory: .gibibytes(8))],
                                      memoryTotal: .gibibytes(16), reservedMemory: .gibibytes(1))

    func request(_ cpus: Int, _ placement: Placement, memory: ByteCount = .mebibytes(256), owner: String = "t") -> SliceRequest {
        SliceRequest(cpus: cpus, placement: placement, memory: memory, owner: owner)
    }

    @Test func dedicatedTakesWholeCoresOnOneNode() throws {
        let (a, dir) = try Fixture.allocator(Self.twoNode)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let g1 = try a.allocate(request(2, .dedicated))
        #expect(g1.slice.cpuSet == [0, 4], "two CPUs: both threads of one core")
        #expect(g1.slice.numaNode == 0)
        let g2 = try a.allocate(request(1, .dedicated))
        let g3 = try a.allocate(request(1, .dedicated))
        // The node with more free CPUs wins (node 1), and the second single CPU fills the same core.
        #expect(g2.slice.numaNode == 1 && g3.slice.numaNode == 1)
        #expect(Set(g2.slice.cpuSet + g3.slice.cpuSet).count == 2)
        #expect(Self.twoNode.cores.contains { Set($0) == Set(g2.slice.cpuSet + g3.slice.cpuSet) })
        let g4 = try a.allocate(request(3, .dedicated))
        #expect(g4.slice.numaNode == nil || Set(g4.slice.cpuSet.map(Self.twoNode.node(of:))).count == 1)
        #expect(Set([g1, g2, g3, g4].flatMap(\.slice.cpuSet)).count == 7)
    }

    @Test func dedicatedSpansNodesOnlyWhenNoNodeFits() throws {
        let (a, dir) = try Fixture.allocator(Self.twoNode)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let g = try a.allocate(request(6, .dedicated))
        #expect(g.slice.numaNode == nil)
        #expect(g.slice.cpuSet.count == 6)
    }

    @Test func dedicatedMemoryFollowsTheNodeWithRoom() throws {
        let (a, dir) = try Fixture.allocator(Self.twoNode)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let big = try a.allocate(request(1, .dedicated, memory: .gibibytes(7)))
        let next = try a.allocate(request(1, .dedicated, memory: .gibibytes(2)))
        #expect(big.slice.numaNode != nil)
        #expect(next.slice.numaNode != big.slice.numaNode, "the first node has only 1G left")
    }

    @Test func refusalNamesTheResourceAndTheShortfall() throws {
        let small = HostCapacity(onlineCPUs: [0, 1], memoryTotal: .mebibytes(4608), reservedMemory: .gibibytes(1))
        let (a, dir) = try Fixture.allocator(small)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try a.allocate(request(1, .dedicated, memory: .gibibytes(2)))
        let cpuError = try #require(throws: MicroVMError.self) { try a.allocate(request(2, .dedicated)) }
        #expect(cpuError.code == .insufficientResources)
        #expect(cpuError.message.hasPrefix("needs 2 dedicated CPUs, 1 free"), "\(cpuError.message)")
        let memError = try #require(throws: MicroVMError.self) { try a.allocate(request(1, .shared, memory: .gibibytes(4))) }
        #expect(memError.message.hasPrefix("needs 4G of memory, 1.5G free after the 1G host reservation"), "\(memError.message)")
        #expect(try a.grants().count == 1, "a refusal grants nothing")
    }

    @Test func badInputIsRejectedClearly() throws {
        let (a, dir) = try Fixture.allocator(Self.twoNode)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let cases: [(SliceRequest, String)] = [
            (request(0, .shared), "at least 1 CPU"),
            (request(9, .shared), "8 grantable"),
            (request(1, .shared, memory: .gibibytes(32)), "host has 16G"),
            (request(1, .shared, memory: 0), "needs memory"),
            (SliceRequest(cpus: 1, weight: 0, memory: .mebibytes(64), owner: "t"), "weight"),
            (SliceRequest(cpus: 1, quota: 2, memory: .mebibytes(64), owner: "t"), "quota"),
            (SliceRequest(cpus: 1, placement: .dedicated, memory: .mebibytes(64), owner: "t", cpuSet: [1]), "only be given for pinned"),
            (SliceRequest(cpus: 2, placement: .pinned, memory: .mebibytes(64), owner: "t", cpuSet: [1]), "lists 1 distinct"),
            (SliceRequest(cpus: 1, placement: .pinned, memory: .mebibytes(64), owner: "t", cpuSet: [12]), "not grantable"),
        ]
        for (r, text) in cases {
            let e = try #require(throws: MicroVMError.self) { try a.allocate(r) }
            #expect(e.code == .invalidArgument && e.message.contains(text), "\(e.message)")
        }
        #expect(throws: MicroVMError.self) { try Placement(parsing: "exclusive") }
        #expect(try a.grants().isEmpty)
    }

    @Test func pinnedNeverSharesWithDedicated() throws {
        let (a, dir) = try Fixture.allocator(Self.twoNode)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let p = try a.allocate(SliceRequest(cpus: 2, placement: .pinned, memory: .mebibytes(64), owner: "p", cpuSet: [0, 4]))
        let p2 = try a.allocate(SliceRequest(cpus: 1, placement: .pinned, memory: .mebibytes(64), owner: "p2", cpuSet: [0]))
        #expect(p.slice.cpuSet == [0, 4] && p2.slice.cpuSet == [0], "pinned grants may share")
        let d = try a.allocate(request(6, .dedicated))
        #expect(Set(d.slice.cpuSet).isDisjoint(with: [0, 4]))
        let e = try #require(throws: MicroVMError.self) { try a.allocate(request(1, .dedicated)) }
        #expect(e.message.contains("held by pinned grants"), "\(e.message)")
        let e2 = try #require(throws: MicroVMError.self) {
            try a.allocate(SliceRequest(cpus: 1, placement: .pinned, memory: .mebibytes(64), owner: "x", cpuSet: [d.slice.cpuSet[0]]))
        }
        #expect(e2.code == .insufficientResources)
    }

    @Test func sharedGrantsRunOnThePoolAndOvercommitOnlyThere() throws {
        var cap = HostCapacity(onlineCPUs: [0, 1, 2, 3], memoryTotal: .gibibytes(5), reservedMemory: .gibibytes(1), memoryOvercommit: 2.0)
        let (a, dir) = try Fixture.allocator(cap)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let s = try a.allocate(request(2, .shared, memory: .gibibytes(4)))
        #expect(s.slice.cpuSet == [0, 1, 2, 3])
        let s2 = try a.allocate(request(2, .shared, memory: .gibibytes(4)))
        #expect(s2.slice.memory == .gibibytes(4), "two 4G shared grants fit in 4G at ratio 2")
        #expect(throws: MicroVMError.self) { try a.allocate(request(1, .pinned, memory: .mebibytes(16))) }
        try a.release(s2.id)
        #expect(throws: MicroVMError.self) { try a.allocate(request(1, .dedicated, memory: .gibibytes(3))) }
        let d = try a.allocate(request(2, .dedicated, memory: .mebibytes(512)))
        // The pool shrank: the shared grant follows it, and the widest shared grant keeps its 2 CPUs.
        let shared = try #require(try a.grants().first { $0.id == s.id })
        #expect(Set(shared.slice.cpuSet).isDisjoint(with: d.slice.cpuSet) && shared.slice.cpuSet.count == 2)
        let e = try #require(throws: MicroVMError.self) { try a.allocate(request(1, .dedicated)) }
        #expect(e.message.contains("shared pool must keep 2"), "\(e.message)")
        #expect(try a.events().contains { $0.kind == "reshape" })
        cap.memoryOvercommit = 1.0
        #expect(cap.grantableMemory == .gibibytes(4))
    }

    @Test func hugePagesComeFromThePool() throws {
        let cap = HostCapacity(onlineCPUs: [0, 1], memoryTotal: .gibibytes(8), hugePages: .init(total: 256, free: 256, pageSize: .kibibytes(2048)),
                               reservedMemory: .gibibytes(1))
        let (a, dir) = try Fixture.allocator(cap)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let g = try a.allocate(SliceRequest(cpus: 1, memory: .mebibytes(300), hugePages: true, owner: "h"))
        #expect(g.hugePageCount == 150)
        let e = try #require(throws: MicroVMError.self) { try a.allocate(SliceRequest(cpus: 1, memory: .mebibytes(256), hugePages: true, owner: "h")) }
        #expect(e.message.contains("needs 128 huge pages") && e.message.contains("106 free"), "\(e.message)")
        #expect(try a.usage().hugePagesFree == 106)
        #expect(try a.usage().memoryUsed == 0, "huge pages do not count against ordinary memory")
    }

    @Test func ociMappingOfASlice() throws {
        let slice = ResourceSlice(cpus: 2, placement: .pinned, cpuSet: [2, 3], cpuWeight: 50, cpuQuota: 1.5,
                                  memory: .mebibytes(512), pidsLimit: 100, numaNode: 1)
        let oci = OCIResources(slice: slice)
        #expect(oci.cpu == .init(shares: 512, quota: 150_000, period: 100_000, cpus: "2-3", mems: "1"))
        #expect(oci.memory.limit == 512 << 20 && oci.memory.swap == 512 << 20)
        #expect(oci.pids?.limit == 100)
        let json = String(decoding: try JSONEncoder().encode(oci), as: UTF8.self)
        #expect(json.contains("\"shares\":512"))
        #expect(OCIResources(slice: ResourceSlice(cpus: 1, memory: .mebibytes(64))).cpu.quota == nil)
    }
}
