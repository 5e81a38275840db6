import Devices
import Foundation
import GuestMemory
import MicroVMCore
import Synchronization
import Testing

/// Plays a virtio-net driver on both queues (0 receive, 1 transmit). The tap is a datagram
/// socket pair: like a tap, each read or write is one whole frame, and the test holds the
/// "host" end.
final class NetDriver: GuestSide {
    struct Rings {
        let desc: UInt64, avail: UInt64, used: UInt64
        var nextDesc: UInt16 = 0, availIdx: UInt16 = 0
    }
    let ram: GuestRAM
    let t: VirtioMMIOTransport
    let net: VirtioNet
    let irq = VirtioIRQ()
    let qsize: UInt16 = 16
    var rings = [Rings(desc: 0x10000, avail: 0x11000, used: 0x12000), Rings(desc: 0x20000, avail: 0x21000, used: 0x22000)]
    var dataCursor: UInt64 = 0x100000
    /// [0]: the device's end, [1]: the host's end.
    let sock: [Int32]
    var offered: UInt64 = 0

    init(features: UInt64 = 1 << 32 | VirtioNet.featureMAC, offloads: Bool = false, negotiate: Bool = true,
         memory seenByDevice: ((GuestRAM) -> any GuestMemory)? = nil) throws {
        var fds: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0, &fds) == 0 else { throw MicroVMError.invalidArgument("socketpair failed") }
        _ = fcntl(fds[0], F_SETFL, O_NONBLOCK)
        // A frame of 64 KiB must fit the socket's buffers, as it fits a tap.
        var big: Int32 = 1 << 20
        for fd in fds {
            setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, 4); setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, 4)
        }
        sock = fds
        ram = try GuestRAM(size: .mebibytes(4))
        net = VirtioNet(tapFD: fds[0], mac: [2, 0, 0, 0, 0, 1], offloads: offloads)
        t = try VirtioMMIOTransport(device: net, memory: seenByDevice?(ram) ?? ram, interrupt: irq)
        guard negotiate else { return }
        w(0x70, 0); w(0x70, 1); w(0x70, 3)
        w(0x14, 0); offered = UInt64(r(0x10)); w(0x14, 1); offered |= UInt64(r(0x10)) << 32
        w(0x24, 0); w(0x20, UInt32(truncatingIfNeeded: features)); w(0x24, 1); w(0x20, UInt32(features >> 32))
        w(0x70, 3 | 8)
        for q in 0..<2 {
            w(0x30, UInt32(q)); w(0x38, UInt32(qsize))
            w(0x80, UInt32(rings[q].desc)); w(0x84, 0); w(0x90, UInt32(rings[q].avail)); w(0x94, 0)
            w(0xa0, UInt32(rings[q].used)); w(0xa4, 0)
            w(0x44, 1)
        }
        w(0x70, 3 | 8 | 4)
    }

    deinit { sock.forEach { close($0) } }


    /// Posts (address, length, writable) buffers as one chain on `queue` and publishes it.
    @discardableResult
    func post(queue q: Int, _ bufs: [(UInt64, UInt32, Bool)]) throws -> UInt16 {
        let head = rings[q].nextDesc
        for (k, b) in bufs.enumerated() {
            let i = (head &+ UInt16(k)) % qsize
            let d = rings[q].desc + 16 * UInt64(i)
            let last = k == bufs.count - 1
            try ram.write(b.0, at: GuestAddress(d)); try ram.write(b.1, at: GuestAddress(d + 8))
            try ram.write(UInt16((last ? 0 : 1) | (b.2 ? 2 : 0)), at: GuestAddress(d + 12))
            try ram.write(UInt16((i + 1) % qsize), at: GuestAddress(d + 14))
        }
        rings[q].nextDesc = (head &+ UInt16(bufs.count)) % qsize
        try ram.write(head, at: GuestAddress(rings[q].avail + 4 + 2 * UInt64(rings[q].availIdx % qsize)))
        rings[q].availIdx &+= 1
        try ram.write(rings[q].availIdx, at: GuestAddress(rings[q].avail + 2))
        return head
    }

    func kick(_ q: Int) -> Int { w(0x50, UInt32(q)); return t.processQueues() }
    func usedIdx(_ q: Int) -> UInt16 { try! ram.read(at: GuestAddress(rings[q].used + 2)) }
    func usedLen(_ q: Int, _ i: UInt16) -> UInt32 { try! ram.read(at: GuestAddress(rings[q].used + 8 + 8 * UInt64(i % qsize))) }

    /// Sends a frame from the "host" into the device's tap end.
    func hostSend(_ bytes: [UInt8]) { #expect(bytes.withUnsafeBytes { send(sock[1], $0.baseAddress, $0.count, 0) } == bytes.count) }
    /// One frame the device wrote to the tap, or nil if none is waiting.
    func hostReceive() -> [UInt8]? {
        var buf = [UInt8](repeating: 0, count: 70_000)
        let n = buf.withUnsafeMutableBytes { recv(sock[1], $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
        return n < 0 ? nil : Array(buf[0..<n])
    }
}

/// A 12-byte virtio-net header (flags, gso type, the rest zero) and an Ethernet frame of `n` bytes.
func netFrame(_ n: Int, flags: UInt8 = 0, gso: UInt8 = 0, fill: UInt8 = 0xab) -> [UInt8] {
    [flags, gso] + [UInt8](repeating: 0, count: 10) + [UInt8](repeating: fill, count: n)
}

@Suite("Virtio net")
struct VirtioNetTests {
    @Test func identityAndConfig() throws {
        let d = try NetDriver()
        #expect(d.r(0x008) == 1)
        #expect(d.t.status & 4 != 0)
        #expect(d.offered & VirtioNet.featureMAC != 0)
        #expect(d.offered & VirtioNet.featureCsum == 0, "offloads are off in this driver")
        var mac = [UInt8](repeating: 0, count: 8)
        mac.withUnsafeMutableBytes { d.t.read(offset: 0x100, data: $0) }
        #expect(Array(mac[0..<6]) == [2, 0, 0, 0, 0, 1])
        #expect(mac[6] == 1, "link up")
        let withOffloads = try NetDriver(offloads: true)
        #expect(withOffloads.offered & (VirtioNet.featureGuestTSO4 | VirtioNet.featureHostTSO4 | VirtioNet.featureCsum) != 0)
    }

    @Test func transmitReachesTheTap() throws {
        let d = try NetDriver()
        let frame = netFrame(60)
        let hdr = try d.alloc(Array(frame[0..<12])), body = try d.alloc(Array(frame[12...]))
        try d.post(queue: 1, [(hdr, 12, false), (body, 60, false)])
        #expect(d.kick(1) == 1)
        let got = d.hostReceive()
        #expect(got == frame)
        #expect(d.usedIdx(1) == 1)
        #expect(d.net.framesSent.load(ordering: .relaxed) == 1)
        #expect(d.irq.count.load(ordering: .relaxed) >= 1)
    }

    @Test func receiveFillsPostedBuffers() throws {
        let d = try NetDriver()
        for _ in 0..<3 { try d.post(queue: 0, [(try d.alloc([UInt8](repeating: 0, count: 1526)), 1526, true)]) }
        _ = d.kick(0)
        let frames = [netFrame(60, fill: 1), netFrame(1514, fill: 2)]
        frames.forEach(d.hostSend)
        _ = d.t.processQueues()
        #expect(d.usedIdx(0) == 2)
        #expect(d.usedLen(0, 0) == 72)
        #expect(d.usedLen(0, 1) == 1526)
        // The second buffer holds the second frame, with num_buffers = 1.
        let buf1: [UInt8] = try d.ram.readBytes(at: GuestAddress(0x100000 + 1536), count: 1526)
        var want = frames[1]; want[10] = 1
        #expect(buf1 == want)
        #expect(d.net.framesReceived.load(ordering: .relaxed) == 2)
    }

    /// With mergeable receive buffers (as Linux negotiates them) a frame larger than one buffer
    /// spreads over several, published at once, and the first buffer's header says how many.
    @Test func mergeableBuffersCarryAFrameOverSeveral() throws {
        let d = try NetDriver(features: 1 << 32 | VirtioNet.featureMAC | VirtioNet.featureMergeableRx)
        #expect(d.offered & VirtioNet.featureMergeableRx != 0)
        let buffers = try (0..<4).map { _ in try d.alloc([UInt8](repeating: 0, count: 2048)) }
        for b in buffers { try d.post(queue: 0, [(b, 2048, true)]) }
        _ = d.kick(0)
        var big = netFrame(5000, fill: 0)
        for i in 12..<big.count { big[i] = UInt8(truncatingIfNeeded: i * 7) }
        d.hostSend(big)
        d.hostSend(netFrame(60, fill: 9))
        _ = d.t.processQueues()
        #expect(d.usedIdx(0) == 4, "three buffers for the big frame, one for the small")
        #expect([d.usedLen(0, 0), d.usedLen(0, 1), d.usedLen(0, 2), d.usedLen(0, 3)] == [2048, 2048, 5012 - 4096, 72])
        var got: [UInt8] = []
        for (b, n) in zip(buffers.prefix(3), [2048, 2048, 5012 - 4096]) { got += try d.ram.readBytes(at: GuestAddress(b), count: n) }
        var want = big; want[10] = 3; want[11] = 0
        #expect(got == want)
        let small: [UInt8] = try d.ram.readBytes(at: GuestAddress(buffers[3]), count: 72)
        #expect(small[10] == 1 && small[11] == 0 && small[12...].allSatisfy { $0 == 9 })
        #expect(d.net.framesReceived.load(ordering: .relaxed) == 2)
        #expect(d.t.bytesToGuest.load(ordering: .relaxed) == 5012 + 72)
    }

    /// A frame waits, taking nothing, until the driver has posted room for all of it.
    @Test func mergeableFrameWaitsForEnoughRoom() throws {
        let d = try NetDriver(features: 1 << 32 | VirtioNet.featureMAC | VirtioNet.featureMergeableRx)
        try d.post(queue: 0, [(try d.alloc([UInt8](repeating: 0, count: 1024)), 1024, true)])
        _ = d.kick(0)
        d.hostSend(netFrame(3000))
        _ = d.t.processQueues()
        #expect(d.usedIdx(0) == 0)
        #expect(!d.net.wantsSource, "the frame is held; the tap is not polled meanwhile")
        for _ in 0..<2 { try d.post(queue: 0, [(try d.alloc([UInt8](repeating: 0, count: 1024)), 1024, true)]) }
        _ = d.kick(0)
        #expect(d.usedIdx(0) == 3)
        #expect([d.usedLen(0, 0), d.usedLen(0, 1), d.usedLen(0, 2)] == [1024, 1024, 3012 - 2048])
        #expect(d.net.wantsSource)
        #expect(d.net.framesDropped.load(ordering: .relaxed) == 0 && !d.needsReset)
    }

    /// A driver with EVENT_IDX (as Linux) kicks only when its new entries pass the available
    /// event the device set. A frame held for want of room must leave that event past every
    /// entry already posted, so the next buffers bring a kick. Set back to the entries given
    /// back, which the driver had passed long before, it brought none, and the receive queue
    /// stalled for good (host-to-guest TCP in the rig, then not even ARP).
    @Test func aHeldFrameAsksForAKickAtTheDriversNextBuffer() throws {
        let d = try NetDriver(features: 1 << 32 | VirtioMMIOTransport.featureEventIdx | VirtioNet.featureMAC | VirtioNet.featureMergeableRx)
        for _ in 0..<2 { try d.post(queue: 0, [(try d.alloc([UInt8](repeating: 0, count: 1024)), 1024, true)]) }
        _ = d.kick(0)
        d.hostSend(netFrame(3000))
        _ = d.t.processQueues()
        #expect(d.usedIdx(0) == 0, "two buffers cannot hold the frame: it waits")
        let old = d.rings[0].availIdx
        try d.post(queue: 0, [(try d.alloc([UInt8](repeating: 0, count: 1024)), 1024, true)])
        let new = d.rings[0].availIdx
        let event: UInt16 = try d.ram.read(at: GuestAddress(d.rings[0].used + 4 + 8 * UInt64(d.qsize)))
        // vring_need_event, as the driver computes it.
        #expect(new &- event &- 1 < new &- old, "no kick would come: available event \(event), new entries \(old)..<\(new)")
        _ = d.kick(0)
        #expect(d.usedIdx(0) == 3 && d.net.framesReceived.load(ordering: .relaxed) == 1)
    }

    /// A hostile driver that moves its available index between each of the device's looks (from
    /// another vCPU) must not keep the device's thread in the receive path: it gives up after a
    /// ring's worth of looks and holds the frame, as for a driver that posted too little.
    @Test func aDriverMovingItsIndexWhileTheDeviceLooksCannotKeepItThere() throws {
        var flipper: IndexFlipper?
        let d = try NetDriver(features: 1 << 32 | VirtioMMIOTransport.featureEventIdx | VirtioNet.featureMAC | VirtioNet.featureMergeableRx,
                              memory: { ram in let f = IndexFlipper(ram); flipper = f; return f })
        try d.post(queue: 0, [(try d.alloc([UInt8](repeating: 0, count: 1024)), 1024, true)])
        _ = d.kick(0)
        d.hostSend(netFrame(3000))
        // From here the device sees the index as 1, 1, then 2, and over again: each look finds
        // nothing new to take, and each check after setting the event finds it moved.
        let f = try #require(flipper)
        f.start(at: GuestAddress(d.rings[0].avail + 2), low: 1, high: 2)
        _ = d.t.processQueues()
        #expect(f.reads > 3 && f.reads < 4 * Int(d.qsize), "the device looked \(f.reads) times")
        #expect(d.usedIdx(0) == 0 && !d.net.wantsSource, "the frame is held")
    }

    /// A frame that a whole ring of the driver's buffers cannot hold is dropped, not waited for
    /// forever: the buffers come back empty and the next frame goes through.
    @Test func mergeableFrameLargerThanTheWholeRingIsDropped() throws {
        let d = try NetDriver(features: 1 << 32 | VirtioNet.featureMAC | VirtioNet.featureMergeableRx)
        for _ in 0..<Int(d.qsize) { try d.post(queue: 0, [(try d.alloc([UInt8](repeating: 0, count: 64)), 64, true)]) }
        _ = d.kick(0)
        d.hostSend(netFrame(3000))
        _ = d.t.processQueues()
        #expect(d.usedIdx(0) == d.qsize)
        #expect((0..<d.qsize).allSatisfy { d.usedLen(0, $0) == 0 })
        #expect(d.net.framesDropped.load(ordering: .relaxed) == 1)
        #expect(d.net.wantsSource, "the tap is read again")
        try d.post(queue: 0, [(try d.alloc([UInt8](repeating: 0, count: 2048)), 2048, true)])
        d.hostSend(netFrame(40))
        _ = d.kick(0)
        _ = d.t.processQueues()
        #expect(d.usedIdx(0) == d.qsize + 1)
        #expect(d.usedLen(0, d.qsize) == 52)
        #expect(!d.needsReset)
    }

    @Test func frameWaitsForBuffersWithoutSpinning() throws {
        let d = try NetDriver()
        d.hostSend(netFrame(100, fill: 7))
        _ = d.t.processQueues()
        #expect(d.usedIdx(0) == 0)
        #expect(d.net.wantsSource == false, "with a frame held and no buffer, the tap is not polled")
        let buf = try d.alloc([UInt8](repeating: 0, count: 2048))
        try d.post(queue: 0, [(buf, 2048, true)])
        _ = d.kick(0)
        #expect(d.usedIdx(0) == 1)
        #expect(d.usedLen(0, 0) == 112)
        #expect(d.net.wantsSource)
        #expect(d.net.framesDropped.load(ordering: .relaxed) == 0)
    }

    /// A transmit kick serves the transmit queue only; the tap is read when it is ready or when the
    /// driver posts receive buffers.
    @Test func transmitKicksDoNotReadTheTap() throws {
        let d = try NetDriver()
        #expect(d.t.processQueues() == 0, "takes the wake-up that DRIVER_OK left on the receive queue")
        try d.post(queue: 0, [(try d.alloc([UInt8](repeating: 0, count: 2048)), 2048, true)])
        d.hostSend(netFrame(40))
        let f = netFrame(60)
        try d.post(queue: 1, [(try d.alloc(f), UInt32(f.count), false)])
        d.w(0x50, 1)
        #expect(d.t.processQueues(sourceReady: false) == 1)
        #expect(d.usedIdx(0) == 0, "the frame waits for the tap's turn")
        #expect(d.t.processQueues(sourceReady: true) == 1)
        #expect(d.usedIdx(0) == 1)
    }

    @Test func shortBufferDropsTheFrameNotTheDevice() throws {
        let d = try NetDriver()
        try d.post(queue: 0, [(try d.alloc([UInt8](repeating: 0, count: 64)), 64, true)])
        try d.post(queue: 0, [(try d.alloc([UInt8](repeating: 0, count: 2048)), 2048, true)])
        _ = d.kick(0)
        d.hostSend(netFrame(1000))
        d.hostSend(netFrame(50))
        _ = d.t.processQueues()
        #expect(d.usedIdx(0) == 2)
        #expect(d.usedLen(0, 0) == 0, "the too-small buffer comes back empty")
        #expect(d.usedLen(0, 1) == 62)
        #expect(d.net.framesDropped.load(ordering: .relaxed) == 1)
        #expect(!d.needsReset)
    }

    @Test func transmitHeadersAskingForUnnegotiatedOffloadsAreDropped() throws {
        let d = try NetDriver()
        for (flags, gso) in [(UInt8(1), UInt8(0)), (0, 1), (0, 4), (0, 3), (0, 0x81)] {
            let f = netFrame(60, flags: flags, gso: gso)
            try d.post(queue: 1, [(try d.alloc(f), UInt32(f.count), false)])
        }
        // Too short (header only) and too long (beyond a 64 KiB segment).
        try d.post(queue: 1, [(try d.alloc([UInt8](repeating: 0, count: 12)), 12, false)])
        try d.post(queue: 1, [(try d.alloc([UInt8](repeating: 0, count: 12)), 12, false), (0x200000, UInt32(VirtioNet.maxFrame + 1), false)])
        _ = d.kick(1)
        #expect(d.usedIdx(1) == 7)
        #expect(d.hostReceive() == nil)
        #expect(d.net.framesDropped.load(ordering: .relaxed) == 7)
        #expect(!d.needsReset)
    }

    @Test func negotiatedOffloadsPassTheHeaderThrough() throws {
        let features: UInt64 = 1 << 32 | VirtioNet.featureCsum | VirtioNet.featureHostTSO4 | VirtioNet.featureGuestCsum
        let d = try NetDriver(features: features, offloads: true)
        var f = netFrame(3000, flags: 1, gso: 1)
        f[10] = 9  // num_buffers is the device's to set; a transmit header's value is cleared
        try d.post(queue: 1, [(try d.alloc(f), UInt32(f.count), false)])
        _ = d.kick(1)
        var want = f; want[10] = 0
        #expect(d.hostReceive() == want)
    }

    @Test func resetDropsTheHeldFrame() throws {
        let d = try NetDriver()
        d.hostSend(netFrame(80, fill: 3))
        _ = d.t.processQueues()
        #expect(!d.net.wantsSource)
        d.w(0x70, 0)
        #expect(d.net.wantsSource, "a reset forgets the held frame")
        #expect(d.t.status == 0)
    }

    /// Frames on the tap of a device the guest never made live (or broke) must not spin the
    /// I/O thread: nothing would read them.
    @Test func framesForADeviceThatIsNotLiveDoNotSpinTheThread() throws {
        let idle = try NetDriver(negotiate: false)
        try idle.t.start()
        idle.hostSend(netFrame(60))
        usleep(200_000)
        #expect(idle.t.wakeups.load(ordering: .relaxed) < 5, "the I/O thread woke \(idle.t.wakeups.load(ordering: .relaxed)) times")
        idle.t.stop()

        let broken = try NetDriver()
        try broken.t.start()
        defer { broken.t.stop() }
        try broken.ram.write(UInt16(999), at: GuestAddress(broken.rings[1].avail + 2))  // an avail index past the queue size
        broken.w(0x50, 1)
        var waited = 0
        while !broken.needsReset && waited < 2000 { usleep(1000); waited += 1 }
        #expect(broken.needsReset)
        let before = broken.t.wakeups.load(ordering: .relaxed)
        broken.hostSend(netFrame(60))
        usleep(200_000)
        #expect(broken.t.wakeups.load(ordering: .relaxed) - before < 5)
    }

    @Test func ioThreadDeliversFromTheTap() throws {
        let d = try NetDriver()
        try d.t.start()
        defer { d.t.stop() }
        for _ in 0..<4 { try d.post(queue: 0, [(try d.alloc([UInt8](repeating: 0, count: 1600)), 1600, true)]) }
        d.w(0x50, 0)
        for i in 0..<4 { d.hostSend(netFrame(100 + i)) }
        var waited = 0
        while d.usedIdx(0) < 4 && waited < 5000 { usleep(1000); waited += 1 }
        #expect(d.usedIdx(0) == 4)
        #expect(d.irq.count.load(ordering: .relaxed) >= 1)
    }

    @Test func networkWithoutAnOpenTapIsRefused() throws {
        let ram = try GuestRAM(size: .mebibytes(1))
        let spec = VMSpec(name: "n", net: NetSpec())
        #expect(throws: MicroVMError.self) { _ = try VirtioDevices.make(spec: spec, memory: ram) { _ in VirtioIRQ() } }
    }
}

extension NetDriver {
    var needsReset: Bool { r(0x70) & 64 != 0 }
}

@Suite("Virtio vsock")
struct VirtioVsockTests {
    @Test(arguments: [UInt32(0), 1, 2, UInt32.max])
    func reservedCIDsAreRefused(_ cid: UInt32) throws {
        let ram = try GuestRAM(size: .mebibytes(1))
        #expect {
            _ = try VirtioVsock(cid: cid, regions: ram.regions)
        } throws: { error in
            "\(error)".contains("reserved") && "\(error)".contains("3 or more")
        }
    }

    @Test func missingVhostDeviceSaysWhatToLoad() throws {
        let ram = try GuestRAM(size: .mebibytes(1))
        #expect {
            _ = try VirtioVsock(cid: 42, regions: ram.regions, device: "/nonexistent/vhost-vsock")
        } throws: { error in
            "\(error)".contains("modprobe vhost_vsock")
        }
    }
}

/// Guest memory whose 16-bit word at one address reads as `low`, `low`, `high`, over and over:
/// a driver changing its available index between the device's reads of it.
final class IndexFlipper: GuestMemory, @unchecked Sendable {
    let ram: GuestRAM
    private var watched: GuestAddress?
    private var low: UInt16 = 0, high: UInt16 = 0
    private(set) var reads = 0
    init(_ ram: GuestRAM) { self.ram = ram }
    var end: GuestAddress { ram.end }
    func start(at address: GuestAddress, low: UInt16, high: UInt16) { watched = address; self.low = low; self.high = high }
    func hostPointer(at address: GuestAddress, count: Int) throws -> UnsafeMutableRawPointer {
        if address == watched, count == 2 {
            reads += 1
            try ram.write(reads % 3 == 0 ? high : low, at: address)
        }
        return try ram.hostPointer(at: address, count: count)
    }
}
