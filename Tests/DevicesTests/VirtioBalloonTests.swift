import Devices
import Foundation
import GuestMemory
import MicroVMCore
import PropertyBased
import Testing

/// Plays Linux's virtio-balloon driver on its queues (inflate, deflate, then stats and
/// reporting where negotiated), in 16 MiB of guest RAM.
final class BalloonDriver: GuestSide {
    let ram: GuestRAM
    let t: VirtioMMIOTransport
    let balloon: VirtioBalloon
    let irq = VirtioIRQ()
    let qsize: UInt16 = 16
    var rings: [NetDriver.Rings]
    var dataCursor: UInt64 = 0x100000

    init(options: VirtioBalloon.Options = .init(), accept: UInt64? = nil) throws {
        ram = try GuestRAM(size: .mebibytes(16))
        balloon = try VirtioBalloon(options: options, memory: ram)
        t = try VirtioMMIOTransport(device: balloon, memory: ram, interrupt: irq)
        balloon.onConfigChange { [unowned t] in t.configChanged() }
        var rings: [NetDriver.Rings] = []
        for q in 0..<balloon.queueMaxSizes.count {
            let base = UInt64(q + 1) << 16
            rings.append(NetDriver.Rings(desc: base, avail: base + 0x1000, used: base + 0x2000))
        }
        self.rings = rings
        w(0x70, 0); w(0x70, 1); w(0x70, 3)
        let features = (accept ?? balloon.deviceFeatures) | 1 << 32
        w(0x24, 0); w(0x20, UInt32(truncatingIfNeeded: features)); w(0x24, 1); w(0x20, UInt32(features >> 32))
        w(0x70, 3 | 8)
        for q in rings.indices {
            w(0x30, UInt32(q)); w(0x38, UInt32(min(qsize, balloon.queueMaxSizes[q])))
            w(0x80, UInt32(rings[q].desc)); w(0x84, 0); w(0x90, UInt32(rings[q].avail)); w(0x94, 0)
            w(0xa0, UInt32(rings[q].used)); w(0xa4, 0)
            w(0x44, 1)
        }
        w(0x70, 3 | 8 | 4)
    }

    func size(_ q: Int) -> UInt16 { min(qsize, balloon.queueMaxSizes[q]) }

    /// Posts (address, length, writable) buffers as one chain on `queue`.
    func post(queue q: Int, _ bufs: [(UInt64, UInt32, Bool)]) throws {
        let n = size(q)
        let head = rings[q].nextDesc
        for (k, b) in bufs.enumerated() {
            let i = (head &+ UInt16(k)) % n
            let d = rings[q].desc + 16 * UInt64(i)
            try ram.write(b.0, at: GuestAddress(d)); try ram.write(b.1, at: GuestAddress(d + 8))
            try ram.write(UInt16((k == bufs.count - 1 ? 0 : 1) | (b.2 ? 2 : 0)), at: GuestAddress(d + 12))
            try ram.write(UInt16((i + 1) % n), at: GuestAddress(d + 14))
        }
        rings[q].nextDesc = (head &+ UInt16(bufs.count)) % n
        try ram.write(head, at: GuestAddress(rings[q].avail + 4 + 2 * UInt64(rings[q].availIdx % n)))
        rings[q].availIdx &+= 1
        try ram.write(rings[q].availIdx, at: GuestAddress(rings[q].avail + 2))
    }

    func kick(_ q: Int) -> Int { w(0x50, UInt32(q)); return t.processQueues() }
    func usedIdx(_ q: Int) -> UInt16 { try! ram.read(at: GuestAddress(rings[q].used + 2)) }
    func configU32(_ at: UInt64) -> UInt32 { r(0x100 + at) }

    /// PFNs as the driver sends them: little-endian u32s in one readable buffer.
    func pfnBuffer(_ pfns: [UInt32]) throws -> (UInt64, UInt32, Bool) {
        let bytes = pfns.flatMap { withUnsafeBytes(of: $0.littleEndian, Array.init) }
        return (try alloc(bytes), UInt32(bytes.count), false)
    }

    func fill(page pfn: UInt64, with byte: UInt8) throws {
        try ram.writeBytes([UInt8](repeating: byte, count: 4096), at: GuestAddress(pfn * 4096))
    }
    func page(_ pfn: UInt64) throws -> Set<UInt8> { Set(try ram.readBytes(at: GuestAddress(pfn * 4096), count: 4096)) }
}

@Suite("Virtio balloon")
struct VirtioBalloonTests {
    @Test func identityFeaturesAndConfig() throws {
        let d = try BalloonDriver(options: .init(deflateOnOOM: true, statsInterval: 5, freePageReporting: true))
        #expect(d.r(0x008) == 5)
        #expect(d.balloon.deviceFeatures == VirtioBalloon.featureDeflateOnOOM | VirtioBalloon.featureStatsVQ | VirtioBalloon.featurePageReporting)
        #expect(d.balloon.queueMaxSizes.count == 4)
        #expect(d.configU32(0) == 0 && d.configU32(4) == 0)
        // The target goes out with a configuration-change interrupt; the driver answers in `actual`.
        let before = d.irq.count.load(ordering: .relaxed)
        try d.balloon.setTarget(pages: 1024)
        #expect(d.configU32(0) == 1024)
        #expect(d.irq.count.load(ordering: .relaxed) == before + 1 && d.r(0x060) & 2 != 0)
        d.w(0x104, 512)
        #expect(d.balloon.actualPages == 512 && d.configU32(4) == 512)
        d.w(0x100, 7)
        #expect(d.balloon.targetPages == 1024, "the target is the device's: a driver write is ignored")
        #expect(throws: MicroVMError.self) { try d.balloon.setTarget(pages: 5000) }
        #expect(d.balloon.targetPages == 1024)
        let plain = try BalloonDriver()
        #expect(plain.balloon.deviceFeatures == 0 && plain.balloon.queueMaxSizes.count == 2)
    }

    @Test func inflatedPagesGoBackToTheHostAndBadOnesAreCounted() throws {
        let d = try BalloonDriver()
        for pfn: UInt64 in [0x400, 0x401, 0x403] { try d.fill(page: pfn, with: 0xa5) }
        try d.post(queue: 0, [try d.pfnBuffer([0x400, 0x401, 0x401, 0xffff_ffff, 0x5000])])
        #expect(d.kick(0) == 1 && d.usedIdx(0) == 1)
        #expect(try d.page(0x400) == [0] && d.page(0x401) == [0], "inflated pages read back as zero: the host dropped them")
        #expect(try d.page(0x403) == [0xa5], "a page not handed over keeps its content")
        let c = d.balloon.counters
        #expect(c.inflatedPages == 5 && c.discardedBytes == 2 * 4096 && c.rejected == 2, "\(c)")
        try d.post(queue: 1, [try d.pfnBuffer([0x400])])
        #expect(d.kick(1) == 1 && d.balloon.counters.deflatedPages == 1)
    }

    @Test func reportedFreeRangesAreDiscarded() throws {
        let d = try BalloonDriver(options: .init(freePageReporting: true))
        for pfn: UInt64 in 0x500..<0x510 { try d.fill(page: pfn, with: 0x5a) }
        // Queue 2: no stats queue was offered, so reporting comes right after deflate.
        // (A range outside RAM never reaches the device: the transport refuses the whole chain.)
        try d.post(queue: 2, [(0x500 * 4096, 8 * 4096, true), (0x508 * 4096 + 100, 4096, true)])
        #expect(d.kick(2) == 1)
        #expect(try (0x500..<0x508).allSatisfy { try d.page($0) == [0] })
        #expect(try d.page(0x508) == [0x5a] && d.page(0x509) == [0x5a], "a range not covering a whole page discards none of it")
        let c = d.balloon.counters
        #expect(c.reportedBytes == 9 * 4096 && c.discardedBytes == 8 * 4096 && c.rejected == 1, "\(c)")
    }

    @Test func statisticsArriveWhenTheTimerAsks() throws {
        let d = try BalloonDriver(options: .init(statsInterval: 1))
        // The driver primes the stats queue with one buffer: free 100 MiB, total 128 MiB, an unknown tag.
        let stats: [(UInt16, UInt64)] = [(4, 100 << 20), (5, 128 << 20), (6, 90 << 20), (77, 1)]
        let bytes = stats.flatMap { withUnsafeBytes(of: $0.0.littleEndian, Array.init) + withUnsafeBytes(of: $0.1.littleEndian, Array.init) }
        try d.post(queue: 2, [(try d.alloc(bytes), UInt32(bytes.count), false)])
        usleep(20_000)  // the first request comes 1 ms after the device is made
        _ = d.kick(2)
        d.t.processQueues(sourceReady: true)
        #expect(d.usedIdx(2) == 1, "the buffer goes back, so the driver refills it")
        let s = d.balloon.statistics
        #expect(s.values == ["free_memory": 100 << 20, "total_memory": 128 << 20, "available_memory": 90 << 20])
        #expect(s.at != nil && d.balloon.counters.statsUpdates == 1)
        #expect(throws: MicroVMError.self) { try d.balloon.setStatsInterval(0) }
        try d.balloon.setStatsInterval(60)
        #expect(d.balloon.statsInterval == 60)
        // The refilled buffer stays with the device until the next request, a minute away.
        try d.post(queue: 2, [(try d.alloc(bytes), UInt32(bytes.count), false)])
        #expect(d.kick(2) == 0 && d.usedIdx(2) == 1, "a kick alone does not take the held buffer")
        #expect(throws: MicroVMError.self) { try BalloonDriver().balloon.setStatsInterval(1) }
    }

    /// Whatever the guest puts in any queue, the device answers and keeps its counters sane.
    @Test func arbitraryQueueContentNeverBreaksTheDevice() async throws {
        await propertyCheck(count: 50, input: Gen.int(in: 0...3), Gen.int(in: 0...255).array(of: 0...200)) { queue, bytes in
            let d = try BalloonDriver(options: .init(statsInterval: 1, freePageReporting: true))
            let addr = try d.alloc(bytes.map { UInt8($0) })
            try d.post(queue: queue, [(addr, UInt32(bytes.count), queue == 3)])
            _ = d.kick(queue)
            d.t.processQueues(sourceReady: true)
            #expect(d.t.malformed.load(ordering: .relaxed) == 0)
            #expect(d.balloon.counters.discardedBytes <= 16 << 20)
        }
    }
}
