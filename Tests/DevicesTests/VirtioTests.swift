import Devices
import Foundation
import GuestMemory
import MicroVMCore
import Synchronization
import Testing

final class VirtioIRQ: InterruptLine, @unchecked Sendable {
    let count = Atomic<Int>(0)
    func trigger() { count.add(1, ordering: .relaxed) }
    func set(level: Bool) { if level { count.add(1, ordering: .relaxed) } }
}

/// What every test driver does the same way: register reads and writes, and buffers carved from
/// the guest RAM in 16-byte steps.
protocol GuestSide: AnyObject {
    var t: VirtioMMIOTransport { get }
    var ram: GuestRAM { get }
    var dataCursor: UInt64 { get set }
}

extension GuestSide {
    func r(_ off: UInt64) -> UInt32 {
        var v: UInt32 = 0
        withUnsafeMutableBytes(of: &v) { t.read(offset: off, data: $0) }
        return v
    }
    func w(_ off: UInt64, _ v: UInt32) { withUnsafeBytes(of: v) { t.write(offset: off, data: $0) } }

    func alloc(_ bytes: [UInt8]) throws -> UInt64 {
        let a = dataCursor
        try ram.writeBytes(bytes, at: GuestAddress(a))
        dataCursor += UInt64(max(bytes.count, 1) + 15) & ~15
        return a
    }
}

/// Plays the guest driver: rings in a GuestRAM, feature negotiation, chains, kicks.
final class VirtioDriver: GuestSide {
    let ram: GuestRAM
    let t: VirtioMMIOTransport
    let irq = VirtioIRQ()
    let qsize: UInt16
    let desc: UInt64 = 0x10000, avail: UInt64 = 0x20000, used: UInt64 = 0x30000
    var nextDesc: UInt16 = 0
    var availIdx: UInt16 = 0
    var dataCursor: UInt64 = 0x100000

    init(device: any VirtioDevice, qsize: UInt16 = 8, features: UInt64 = 1 << 32) throws {
        ram = try GuestRAM(size: .mebibytes(4))
        t = try VirtioMMIOTransport(device: device, memory: ram, interrupt: irq)
        self.qsize = qsize
        w(0x70, 0); w(0x70, 1); w(0x70, 3)
        w(0x24, 0); w(0x20, UInt32(truncatingIfNeeded: features)); w(0x24, 1); w(0x20, UInt32(features >> 32))
        w(0x70, 3 | 8)
        w(0x30, 0); w(0x38, UInt32(qsize))
        w(0x80, UInt32(desc)); w(0x84, 0); w(0x90, UInt32(avail)); w(0x94, 0); w(0xa0, UInt32(used)); w(0xa4, 0)
        w(0x44, 1)
        w(0x70, 3 | 8 | 4)
    }


    func setDesc(_ i: UInt16, addr: UInt64, len: UInt32, flags: UInt16, next: UInt16, table: UInt64? = nil) throws {
        let d = (table ?? desc) + 16 * UInt64(i)
        try ram.write(addr, at: GuestAddress(d)); try ram.write(len, at: GuestAddress(d + 8))
        try ram.write(flags, at: GuestAddress(d + 12)); try ram.write(next, at: GuestAddress(d + 14))
    }

    /// Posts a chain of (address, length, writable) buffers; returns its head.
    @discardableResult
    func post(_ bufs: [(UInt64, UInt32, Bool)]) throws -> UInt16 {
        let head = nextDesc
        for (k, b) in bufs.enumerated() {
            let i = (head &+ UInt16(k)) % qsize
            let last = k == bufs.count - 1
            try setDesc(i, addr: b.0, len: b.1, flags: (last ? 0 : 1) | (b.2 ? 2 : 0), next: (i + 1) % qsize)
        }
        nextDesc = (head &+ UInt16(bufs.count)) % qsize
        publish(head)
        return head
    }

    func publish(_ head: UInt16) {
        try! ram.write(head, at: GuestAddress(avail + 4 + 2 * UInt64(availIdx % qsize)))
        availIdx &+= 1
        try! ram.write(availIdx, at: GuestAddress(avail + 2))
    }

    func kick() -> Int { w(0x50, 0); return t.processQueues() }
    var usedIdx: UInt16 { try! ram.read(at: GuestAddress(used + 2)) }
    func usedElem(_ i: UInt16) -> (id: UInt32, len: UInt32) {
        let e = used + 4 + 8 * UInt64(i % qsize)
        return (try! ram.read(at: GuestAddress(e)), try! ram.read(at: GuestAddress(e + 4)))
    }
    var needsReset: Bool { r(0x70) & 64 != 0 }
}

func blkHeader(_ type: UInt32, sector: UInt64) -> [UInt8] {
    var h = [UInt8](); withUnsafeBytes(of: type.littleEndian) { h += $0 }; h += [0, 0, 0, 0]
    withUnsafeBytes(of: sector.littleEndian) { h += $0 }
    return h
}

func tempDisk(sectors: Int) throws -> String {
    let p = NSTemporaryDirectory() + "mvm-virtio-\(UUID().uuidString).img"
    #expect(FileManager.default.createFile(atPath: p, contents: Data(count: sectors * 512)))
    return p
}

@Suite("Virtio transport")
struct VirtioTransportTests {
    @Test func identityRegisters() throws {
        let d = try VirtioDriver(device: VirtioRng())
        #expect(d.r(0) == 0x7472_6976)
        #expect(d.r(4) == 2)
        #expect(d.r(8) == 4)
        #expect(d.r(0x34) == 64)
        #expect(d.r(0x70) == 15)
        d.w(0x14, 1)
        #expect(d.r(0x10) & 1 == 1)  // VERSION_1
    }

    @Test func featuresOKRefusedWithoutVersion1() throws {
        let d = try VirtioDriver(device: VirtioRng(), features: 0)
        #expect(d.r(0x70) & 8 == 0)
        #expect(d.r(0x44) == 0)  // a queue cannot go live without FEATURES_OK
    }

    @Test func resetClearsEverything() throws {
        let d = try VirtioDriver(device: VirtioRng())
        let generation = d.r(0xfc)
        d.w(0x70, 0)
        #expect(d.r(0x70) == 0)
        #expect(d.r(0x44) == 0)
        #expect(d.r(0xfc) == generation &+ 1)
    }

    @Test func driverCannotClearStatusBitsWithoutAReset() throws {
        let d = try VirtioDriver(device: VirtioRng())
        #expect(d.r(0x70) & 4 != 0)
        d.w(0x70, 1)
        #expect(d.r(0x70) == 1 | 2 | 8 | 4, "bits stay until a write of 0")
        d.w(0x70, 0)
        #expect(d.r(0x70) == 0)
    }

    @Test func notifyBeforeReadyIsIgnored() throws {
        let ram = try GuestRAM(size: .mebibytes(1))
        let t = try VirtioMMIOTransport(device: VirtioRng(), memory: ram, interrupt: VirtioIRQ())
        t.notify(queue: 0); t.notify(queue: 7)
        #expect(t.processQueues() == 0)
        #expect(t.ignoredAccesses.load(ordering: .relaxed) == 1)
        #expect(t.malformed.load(ordering: .relaxed) == 0)
    }

    @Test func queueSizeNotPowerOfTwoMarksNeedsReset() throws {
        let ram = try GuestRAM(size: .mebibytes(1))
        let t = try VirtioMMIOTransport(device: VirtioRng(), memory: ram, interrupt: VirtioIRQ())
        func w(_ o: UInt64, _ v: UInt32) { withUnsafeBytes(of: v) { t.write(offset: o, data: $0) } }
        w(0x70, 3); w(0x24, 1); w(0x20, 1); w(0x70, 11); w(0x38, 6); w(0x44, 1)
        #expect(t.status & 64 != 0)
        #expect(t.malformed.load(ordering: .relaxed) == 1)
        #expect(t.interruptStatus & 2 != 0)
    }

    @Test func ringsOutsideMemoryRefused() throws {
        let ram = try GuestRAM(size: .mebibytes(1))
        let t = try VirtioMMIOTransport(device: VirtioRng(), memory: ram, interrupt: VirtioIRQ())
        func w(_ o: UInt64, _ v: UInt32) { withUnsafeBytes(of: v) { t.write(offset: o, data: $0) } }
        w(0x70, 3); w(0x24, 1); w(0x20, 1); w(0x70, 11); w(0x38, 8)
        w(0x80, 0xffff_fff0); w(0x84, 0xffff_ffff); w(0x44, 1)
        #expect(t.status & 64 != 0)
    }

    @Test func garbageOnEveryOffsetNeverTraps() throws {
        let path = try tempDisk(sectors: 8); defer { unlink(path) }
        let d = try VirtioDriver(device: VirtioBlock(path: path))
        var rng = SystemRandomNumberGenerator()
        for off in stride(from: UInt64(0), through: 0x200, by: 1) {
            for size in [1, 2, 4, 8] {
                let bytes = (0..<size).map { _ in UInt8.random(in: 0...255, using: &rng) }
                bytes.withUnsafeBytes { d.t.write(offset: off, data: $0) }
                var out = [UInt8](repeating: 0, count: size)
                out.withUnsafeMutableBytes { d.t.read(offset: off, data: $0) }
            }
            _ = d.t.processQueues()
        }
        #expect(d.r(0) == 0x7472_6976)
    }
}

@Suite("Virtio block")
struct VirtioBlockTests {
    @Test func writeThenReadBack() throws {
        let path = try tempDisk(sectors: 64); defer { unlink(path) }
        let d = try VirtioDriver(device: VirtioBlock(path: path))
        let payload = (0..<1024).map { UInt8(truncatingIfNeeded: $0 * 7) }
        let h = try d.alloc(blkHeader(1, sector: 3)), data = try d.alloc(payload), st = try d.alloc([0xff])
        try d.post([(h, 16, false), (data, 1024, false), (st, 1, true)])
        #expect(d.kick() == 1)
        #expect(try d.ram.read(at: GuestAddress(st), as: UInt8.self) == 0)
        let onDisk = try Data(contentsOf: URL(fileURLWithPath: path))
        #expect(Array(onDisk[(3 * 512)..<(3 * 512 + 1024)]) == payload)

        let h2 = try d.alloc(blkHeader(0, sector: 3)), buf = try d.alloc([UInt8](repeating: 0, count: 1024)), st2 = try d.alloc([0xff])
        try d.post([(h2, 16, false), (buf, 1024, true), (st2, 1, true)])
        #expect(d.kick() == 1)
        #expect(try d.ram.readBytes(at: GuestAddress(buf), count: 1024) == payload)
        #expect(try d.ram.read(at: GuestAddress(st2), as: UInt8.self) == 0)
        #expect(d.usedIdx == 2)
        #expect(d.usedElem(1).len == 1025)
        #expect(d.irq.count.load(ordering: .relaxed) >= 2)
    }

    @Test func directIOWithBounceBuffers() throws {
        // O_DIRECT needs a filesystem that supports it; /tmp may be tmpfs, so use the cwd.
        let path = FileManager.default.currentDirectoryPath + "/.mvm-virtio-direct-\(getpid()).img"
        #expect(FileManager.default.createFile(atPath: path, contents: Data(count: 64 * 512)))
        defer { unlink(path) }
        guard let blk = try? VirtioBlock(path: path, direct: true) else {
            print("skipping O_DIRECT round trip: this filesystem refuses O_DIRECT"); return
        }
        let d = try VirtioDriver(device: blk)
        let payload = [UInt8](repeating: 0x5a, count: 4096)
        let h = try d.alloc(blkHeader(1, sector: 8)), data = try d.alloc(payload), st = try d.alloc([0xff])
        try d.post([(h, 16, false), (data, 4096, false), (st, 1, true)])
        _ = d.kick()
        #expect(try d.ram.read(at: GuestAddress(st), as: UInt8.self) == 0)
        let onDisk = try Data(contentsOf: URL(fileURLWithPath: path))
        #expect(Array(onDisk[4096..<8192]) == payload)
    }

    @Test func readOnlyRefusesWrites() throws {
        let path = try tempDisk(sectors: 8); defer { unlink(path) }
        let blk = try VirtioBlock(path: path, readOnly: true)
        #expect(blk.deviceFeatures & VirtioBlock.featureRO != 0)
        let d = try VirtioDriver(device: blk)
        let h = try d.alloc(blkHeader(1, sector: 0)), data = try d.alloc([UInt8](repeating: 1, count: 512)), st = try d.alloc([0xff])
        try d.post([(h, 16, false), (data, 512, false), (st, 1, true)])
        _ = d.kick()
        #expect(try d.ram.read(at: GuestAddress(st), as: UInt8.self) == VirtioBlock.statusIOErr)
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)).allSatisfy { $0 == 0 })
    }

    @Test func outOfRangeSectorsAreIOErrors() throws {
        let path = try tempDisk(sectors: 8); defer { unlink(path) }
        let d = try VirtioDriver(device: VirtioBlock(path: path))
        for sector: UInt64 in [8, 7, UInt64.max, UInt64.max - 1] {
            let h = try d.alloc(blkHeader(0, sector: sector)), buf = try d.alloc([UInt8](repeating: 0, count: 1024)), st = try d.alloc([0xff])
            try d.post([(h, 16, false), (buf, 1024, true), (st, 1, true)])
            _ = d.kick()
            #expect(try d.ram.read(at: GuestAddress(st), as: UInt8.self) == VirtioBlock.statusIOErr)
        }
        #expect(!d.needsReset)
    }

    @Test func flushGetIDAndUnknownType() throws {
        let path = try tempDisk(sectors: 8); defer { unlink(path) }
        let blk = try VirtioBlock(path: path)
        let d = try VirtioDriver(device: blk)
        let h = try d.alloc(blkHeader(4, sector: 0)), st = try d.alloc([0xff])
        try d.post([(h, 16, false), (st, 1, true)])
        _ = d.kick()
        #expect(try d.ram.read(at: GuestAddress(st), as: UInt8.self) == 0)

        let h2 = try d.alloc(blkHeader(8, sector: 0)), id = try d.alloc([UInt8](repeating: 0xee, count: 20)), st2 = try d.alloc([0xff])
        try d.post([(h2, 16, false), (id, 20, true), (st2, 1, true)])
        _ = d.kick()
        let got = try d.ram.readBytes(at: GuestAddress(id), count: 20)
        #expect(Array(got.prefix(blk.serial.count)) == blk.serial)
        #expect(try d.ram.read(at: GuestAddress(st2), as: UInt8.self) == 0)

        let h3 = try d.alloc(blkHeader(99, sector: 0)), st3 = try d.alloc([0xff])
        try d.post([(h3, 16, false), (st3, 1, true)])
        _ = d.kick()
        #expect(try d.ram.read(at: GuestAddress(st3), as: UInt8.self) == VirtioBlock.statusUnsupported)
    }

    @Test func capacityInConfig() throws {
        let path = try tempDisk(sectors: 24); defer { unlink(path) }
        let d = try VirtioDriver(device: VirtioBlock(path: path))
        #expect(d.r(0x100) == 24)
        #expect(d.r(0x104) == 0)
    }
}

@Suite("Virtio rng and hostile rings")
struct VirtioHostileTests {
    @Test func rngDeliversBytes() throws {
        let d = try VirtioDriver(device: VirtioRng())
        let buf = try d.alloc([UInt8](repeating: 0, count: 64))
        try d.post([(buf, 64, true)])
        #expect(d.kick() == 1)
        #expect(d.usedElem(0).len == 64)
        #expect(try d.ram.readBytes(at: GuestAddress(buf), count: 64).contains { $0 != 0 })
    }

    @Test func chainLoopMarksNeedsReset() throws {
        let d = try VirtioDriver(device: VirtioRng())
        let buf = try d.alloc([0, 0, 0, 0])
        try d.setDesc(0, addr: buf, len: 4, flags: 3, next: 1)
        try d.setDesc(1, addr: buf, len: 4, flags: 3, next: 0)
        d.publish(0)
        #expect(d.kick() == 0)
        #expect(d.needsReset)
        #expect(d.t.malformed.load(ordering: .relaxed) == 1)
        #expect(d.r(0x60) & 2 != 0)
        #expect(d.irq.count.load(ordering: .relaxed) == 1)
        // Further kicks do nothing until the driver resets.
        d.publish(0)
        #expect(d.kick() == 0)
        #expect(d.t.lastError?.contains("loop") == true)
    }

    @Test func descriptorOutsideRAM() throws {
        let d = try VirtioDriver(device: VirtioRng())
        try d.setDesc(0, addr: 0x7fff_ffff_f000, len: 64, flags: 2, next: 0)
        d.publish(0)
        _ = d.kick()
        #expect(d.needsReset)
    }

    @Test func lengthOverflowingAddressSpace() throws {
        let d = try VirtioDriver(device: VirtioRng())
        try d.setDesc(0, addr: UInt64.max - 8, len: UInt32.max, flags: 2, next: 0)
        d.publish(0)
        _ = d.kick()
        #expect(d.needsReset)
    }

    @Test func headAndNextOutOfRange() throws {
        let d = try VirtioDriver(device: VirtioRng())
        d.publish(200)
        _ = d.kick()
        #expect(d.needsReset)
        let d2 = try VirtioDriver(device: VirtioRng())
        let buf = try d2.alloc([0])
        try d2.setDesc(0, addr: buf, len: 1, flags: 3, next: 9)
        d2.publish(0)
        _ = d2.kick()
        #expect(d2.needsReset)
    }

    @Test func availIndexJumpingPastQueueSize() throws {
        let d = try VirtioDriver(device: VirtioRng())
        try d.ram.write(UInt16(1000), at: GuestAddress(d.avail + 2))
        _ = d.kick()
        #expect(d.needsReset)
    }

    @Test func availIndexWrapsAt65536() throws {
        let d = try VirtioDriver(device: VirtioRng(), qsize: 4)
        let buf = try d.alloc([UInt8](repeating: 0, count: 8))
        var served = 0
        // 65,540 requests: the 16-bit indices wrap from 65535 to 0 on both rings.
        for _ in 0..<65_540 {
            try d.setDesc(0, addr: buf, len: 8, flags: 2, next: 0)
            d.publish(0)
            served += d.kick()
        }
        #expect(served == 65_540)
        #expect(d.usedIdx == 4)
        #expect(!d.needsReset)
    }

    @Test func indirectTables() throws {
        let d = try VirtioDriver(device: VirtioRng(), features: 1 << 32 | 1 << 28)
        let table: UInt64 = 0x50000
        let a = try d.alloc([UInt8](repeating: 0, count: 8)), b = try d.alloc([UInt8](repeating: 0, count: 8))
        try d.setDesc(0, addr: a, len: 8, flags: 3, next: 1, table: table)
        try d.setDesc(1, addr: b, len: 8, flags: 2, next: 0, table: table)
        try d.setDesc(0, addr: table, len: 32, flags: 4, next: 0)
        d.publish(0)
        #expect(d.kick() == 1)
        #expect(d.usedElem(0).len == 16)

        // Indirect inside indirect is refused.
        try d.setDesc(1, addr: table, len: 32, flags: 4, next: 0, table: table)
        try d.setDesc(0, addr: table, len: 32, flags: 4, next: 0)
        d.publish(0)
        _ = d.kick()
        #expect(d.needsReset)
    }

    @Test func indirectWithoutNegotiationRefused() throws {
        let d = try VirtioDriver(device: VirtioRng())
        try d.setDesc(0, addr: 0x50000, len: 32, flags: 4, next: 0)
        d.publish(0)
        _ = d.kick()
        #expect(d.needsReset)
    }

    @Test func eventIndexSuppressesInterrupts() throws {
        let d = try VirtioDriver(device: VirtioRng(), features: 1 << 32 | 1 << 29)
        let buf = try d.alloc([UInt8](repeating: 0, count: 8))
        // used_event = 5: no interrupt until the used index passes 5.
        try d.ram.write(UInt16(5), at: GuestAddress(d.avail + 4 + 2 * UInt64(d.qsize)))
        for _ in 0..<3 {
            try d.setDesc(0, addr: buf, len: 8, flags: 2, next: 0); d.publish(0); _ = d.kick()
        }
        #expect(d.irq.count.load(ordering: .relaxed) == 0)
        let availEvent: UInt16 = try d.ram.read(at: GuestAddress(d.used + 4 + 8 * UInt64(d.qsize)))
        #expect(availEvent == 3)
        for _ in 0..<3 {
            try d.setDesc(0, addr: buf, len: 8, flags: 2, next: 0); d.publish(0); _ = d.kick()
        }
        #expect(d.irq.count.load(ordering: .relaxed) == 1)
    }

    @Test func ioThreadServesKicks() throws {
        let d = try VirtioDriver(device: VirtioRng())
        try d.t.start()
        defer { d.t.stop() }
        let buf = try d.alloc([UInt8](repeating: 0, count: 8))
        try d.post([(buf, 8, true)])
        d.w(0x50, 0)
        var waited = 0
        while d.usedIdx == 0 && waited < 5000 { usleep(1000); waited += 1 }
        #expect(d.usedIdx == 1)
    }

    @Test func placementOrderAndCmdline() throws {
        let path = try tempDisk(sectors: 8); defer { unlink(path) }
        let ram = try GuestRAM(size: .mebibytes(1))
        let spec = VMSpec(name: "t", disks: [DiskSpec(path: path, readOnly: true, direct: false)])
        let devs = try VirtioDevices.make(spec: spec, memory: ram) { _ in VirtioIRQ() }
        #expect(devs.count == 2)
        #expect(devs[0].transport.device.deviceType == 2)
        #expect(devs[1].transport.device.deviceType == 4)
        #expect(devs[0].cmdline == "virtio_mmio.device=4K@0xd0000000:5")
        #expect(devs[1].cmdline == "virtio_mmio.device=4K@0xd0001000:6")
        devs.forEach { $0.stop() }
    }
}
