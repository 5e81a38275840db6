import Foundation
import Testing
import Host
import MicroVMCore
@testable import Allocator

@Suite struct CapacityTests {
    @Test func readsTopologyNodesMemoryAndHugePagesFromAFakeTree() throws {
        let root = Fixture.tempDir("cap")
        defer { try? FileManager.default.removeItem(atPath: root) }
        let roots = try Fixture.host(at: root, cores: [[0, 4], [1, 5], [2, 6], [3, 7]], nodes: [[0, 1, 4, 5], [2, 3, 6, 7]],
                                     memTotalKB: 32 << 20, hugePages: (64, 60))
        let c = try HostCapacity.probe(roots: roots, reservation: Fixture.reservation(cpus: 2, memory: .gibibytes(2)))
        #expect(c.onlineCPUs == Array(0...7))
        #expect(c.cores == [[0, 4], [1, 5], [2, 6], [3, 7]])
        #expect(c.nodes.map(\.id) == [0, 1])
        #expect(c.nodes[1].cpus == [2, 3, 6, 7])
        #expect(c.nodes[0].memory == .gibibytes(16))
        #expect(c.memoryTotal == .gibibytes(32))
        #expect(c.hugePages == .init(total: 64, free: 60, pageSize: .kibibytes(2048)))
        #expect(c.reservedCPUs == [6, 7], "the highest-numbered CPUs are reserved")
        #expect(c.grantableCPUs == [0, 1, 2, 3, 4, 5])
        #expect(c.grantableMemory == .gibibytes(32) - .gibibytes(2) - .mebibytes(128))
        #expect(c.node(of: 6) == 1)
    }

    @Test func reservedCPUsCanBeNamed() throws {
        let root = Fixture.tempDir("cap")
        defer { try? FileManager.default.removeItem(atPath: root) }
        let roots = try Fixture.host(at: root, cores: (0..<4).map { [$0] })
        let c = try HostCapacity.probe(roots: roots, reservation: Fixture.reservation(cpus: 1, cpuList: "0"))
        #expect(c.reservedCPUs == [0])
        #expect(c.grantableCPUs == [1, 2, 3])
        #expect(c.nodes.count == 1, "a host without node directories is one node")
    }

    @Test func impossibleReservationsAreRefused() throws {
        let root = Fixture.tempDir("cap")
        defer { try? FileManager.default.removeItem(atPath: root) }
        let roots = try Fixture.host(at: root, cores: [[0], [1]], memTotalKB: 4 << 20)
        #expect(throws: MicroVMError.self) { try HostCapacity.probe(roots: roots, reservation: Fixture.reservation(cpus: 2)) }
        #expect(throws: MicroVMError.self) { try HostCapacity.probe(roots: roots, reservation: Fixture.reservation(memory: .gibibytes(8))) }
        #expect(throws: MicroVMError.self) { try HostCapacity.probe(roots: roots, reservation: Fixture.reservation(cpuList: "5")) }
        let empty = Fixture.tempDir("cap")
        defer { try? FileManager.default.removeItem(atPath: empty) }
        let error = try #require(throws: MicroVMError.self) {
            try HostCapacity.probe(roots: HostRoots(proc: empty, sys: empty), reservation: Fixture.reservation())
        }
        #expect(error.message.contains("online"))
    }

    @Test func thisHost() throws {
        let c = try HostCapacity.probe(reservation: Fixture.reservation(memory: .mebibytes(64)))
        #expect(!c.onlineCPUs.isEmpty)
        #expect(c.cores.flatMap { $0 }.sorted() == c.onlineCPUs)
        #expect(c.memoryTotal > .mebibytes(64))
    }
}
