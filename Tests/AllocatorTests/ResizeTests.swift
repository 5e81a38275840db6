import Foundation
import Testing
import PropertyBased
import MicroVMCore
@testable import Allocator

/// A live grant grows and shrinks through the same admission as a new one.
@Suite(.serialized) struct ResizeTests {
    static let host = PropertyTests.host

    @Test func aGrowthThatFitsIsGrantedInPlaceAndLogged() throws {
        let (a, dir) = try Fixture.allocator(Self.host)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let g = try a.allocate(SliceRequest(cpus: 1, quota: 1, memory: .mebibytes(256), owner: "web", ownerPID: 1001))
        try a.hold(g.id, pid: getpid(), what: "runc container init")
        let (old, new) = try a.resize(owner: "web", .init(cpus: 2, memory: .gibibytes(1), weight: 300))
        #expect(old.slice == g.slice, "the grant as it was is returned")
        #expect(new.id == g.id && new.owner == "web" && new.pid == 1001 && new.created == g.created)
        #expect(new.holder?.pid == getpid(), "the holder stays")
        #expect(new.slice.cpus == 2 && new.slice.memory == .gibibytes(1) && new.slice.cpuWeight == 300)
        #expect(new.slice.cpuQuota == 1, "a quota the new count holds stays")
        #expect(try a.grants() == [new])
        let last = try #require(try a.events().last)
        #expect(last.kind == "resize" && last.detail.contains("cpus 1 → 2") && last.detail.contains("weight 100 → 300"))
    }

    @Test func aChangeThatDoesNotFitChangesNothing() throws {
        let (a, dir) = try Fixture.allocator(Self.host)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try a.allocate(SliceRequest(cpus: 2, placement: .dedicated, memory: .gibibytes(8), owner: "big", ownerPID: 1001))
        let g = try a.allocate(SliceRequest(cpus: 1, placement: .dedicated, memory: .gibibytes(1), owner: "small", ownerPID: 1002))
        let before = (try a.grants(), try a.usage(), try a.events().count)
        // 11 GiB grantable, 9 used: 4 GiB more does not fit; 8 CPUs of 7 grantable do not exist.
        let e = try #require(throws: MicroVMError.self) { try a.resize(owner: "small", .init(memory: .gibibytes(5))) }
        #expect(e.code == .insufficientResources && e.message.contains("of memory"), "\(e)")
        let e2 = try #require(throws: MicroVMError.self) { try a.resize(owner: "small", .init(cpus: 6)) }
        #expect(e2.code == .insufficientResources && e2.message.contains("dedicated CPU"), "\(e2)")
        #expect(throws: MicroVMError.self) { try a.resize(owner: "small", .init(weight: 0)) }
        #expect(throws: MicroVMError.self) { try a.resize(owner: "small", .init(cpus: 1, quota: 2)) }
        #expect(throws: MicroVMError.self) { try a.resize(owner: "nobody", .init(cpus: 1)) }
        #expect(throws: MicroVMError.self) { try a.resize(owner: "small", .init()) }
        #expect(try a.grants() == before.0 && a.usage() == before.1 && a.events().count == before.2)
        #expect(try a.grants().first { $0.id == g.id }?.slice.memory == .gibibytes(1))
    }

    @Test func aDedicatedGrantKeepsItsCPUsAndTheSharedPoolFollows() throws {
        let (a, dir) = try Fixture.allocator(Self.host)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let shared = try a.allocate(SliceRequest(cpus: 1, memory: .mebibytes(64), owner: "s", ownerPID: 1001))
        let d = try a.allocate(SliceRequest(cpus: 2, placement: .dedicated, memory: .mebibytes(64), owner: "d", ownerPID: 1002))
        let grown = try a.resize(owner: "d", .init(cpus: 4)).new
        #expect(Set(d.slice.cpuSet).isSubset(of: grown.slice.cpuSet) && grown.slice.cpuSet.count == 4)
        let shrunk = try a.resize(owner: "d", .init(cpus: 1)).new
        #expect(shrunk.slice.cpuSet == [grown.slice.cpuSet[0]])
        let pool = try #require(try a.grants().first { $0.id == shared.id }).slice.cpuSet
        #expect(pool == Self.host.grantableCPUs.filter { $0 != shrunk.slice.cpuSet[0] }, "the shared pool gets the CPUs back")
        PropertyTests.check(try a.grants(), Self.host)
    }

    /// Random grants, resizes and releases never over-commit the host, and a refused resize
    /// leaves the ledger exactly as it was.
    @Test func noSequenceOfResizesOverCommits() async throws {
        await propertyCheck(count: 25, input: Gen.int(in: 0...1_000_000).array(of: 1...30)) { numbers in
            let (a, dir) = try Fixture.allocator(Self.host)
            defer { try? FileManager.default.removeItem(atPath: dir) }
            for (i, n) in numbers.enumerated() {
                let v = n / 3
                switch n % 3 {
                case 0:
                    _ = try? a.allocate(SliceRequest(cpus: 1 + v % 3, placement: [.dedicated, .pinned, .shared][(v / 3) % 3],
                                                     memory: .mebibytes(UInt64(256 << (v % 5))), owner: "o\(i)", ownerPID: 1000))
                case 1:
                    let live = try a.grants()
                    guard !live.isEmpty else { continue }
                    let g = live[v % live.count]
                    let before = try a.grants()
                    do {
                        let r = try a.resize(owner: g.owner, .init(cpus: 1 + v % 5, memory: .mebibytes(UInt64(128 << ((v / 5) % 7)))))
                        #expect(r.new.slice.cpus == 1 + v % 5)
                    } catch let e as MicroVMError {
                        #expect(e.code == .insufficientResources || e.code == .invalidArgument, "\(e)")
                        #expect(try a.grants() == before, "a refused resize changed the ledger")
                    }
                default:
                    let live = try a.grants()
                    if !live.isEmpty { try a.release(live[v % live.count].id) }
                }
                PropertyTests.check(try a.grants(), Self.host)
            }
        }
    }
}
