import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import MicroVMCore

/// Drives a virtio device with arbitrary bytes as the guest's side: the input chooses the device,
/// queue size and features, fills the rings and buffers, and writes registers. Shared by the
/// libFuzzer target (Sources/VirtioFuzz), the random-input executable and the property test.
/// Whatever the bytes, it must return (no trap, no hang).
///
/// ```swift
/// let h = try VirtioFuzzHarness()
/// h.run(Array(randomBytes))
/// ```
public final class VirtioFuzzHarness: @unchecked Sendable {
    public static let ramSize = 1 << 20
    let ram: GuestRAM
    /// The disk as `/proc/self/fd/N` of a file unlinked at once: a fuzzer that stops on a crash,
    /// as fuzzers do, leaves no file behind, and harnesses side by side never share one.
    let diskPath: String
    private let diskFD: Int32

    private final class NullLine: InterruptLine, @unchecked Sendable {
        func trigger() {}
        func set(level: Bool) {}
    }

    public init() throws {
        ram = try GuestRAM(size: ByteCount(UInt64(Self.ramSize)))
        let directory = FileManager.default.temporaryDirectory.path
        let path = directory + "/mvm-virtio-fuzz-\(getpid())-XXXXXX"
        var template = Array(path.utf8CString)
        diskFD = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard diskFD >= 0 else { throw MicroVMError(.internalError, "cannot create the fuzzing disk under \(directory): \(String(cString: strerror(errno)))") }
        unlink(template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) })
        guard ftruncate(diskFD, 64 * 512) == 0 else {
            close(diskFD)
            throw MicroVMError(.internalError, "cannot size the fuzzing disk: \(String(cString: strerror(errno)))")
        }
        diskPath = "/proc/self/fd/\(diskFD)"
    }

    deinit { close(diskFD) }

    /// Layout of `input`: [0] device (0 blk, 1 rng, 2 net, 3 vsock, 4 balloon, modulo 5), [1] log2 queue
    /// size, [2] feature bits (bit0 EVENT_IDX, bit1 INDIRECT, bit2 read-only disk, bit3 bend the
    /// rings towards valid chains, bit4 net offloads negotiated, bit5 the net queue: receive or
    /// transmit, bit6 net mergeable receive buffers negotiated; bits 5-6 the balloon's queue: inflate, deflate, stats or reporting), [3] count of raw register writes, then 8 bytes per register write (offset u16,
    /// size u8, pad, value u32), then bytes copied over guest RAM from 0x1000 on (descriptor
    /// table, rings and buffers). A net device's tap is a datagram socket pair; for the receive
    /// queue two frames cut from the input arrive on it first.
    /// Returns the number of chains the device served.
    @discardableResult
    public func run(_ input: [UInt8]) -> Int {
        guard input.count >= 4 else { return 0 }
        if let p = try? ram.hostPointer(at: 0, count: Self.ramSize) { memset(p, 0, Self.ramSize) }
        var tap: [Int32] = [-1, -1]
        defer { tap.forEach { if $0 >= 0 { close($0) } } }
        let device: any VirtioDevice
        var queue = 0
        var features: UInt64 = 1 << 32
        switch input[0] % 5 {
        case 0: device = (try? VirtioBlock(path: diskPath, readOnly: input[2] & 4 != 0, queueSize: 256)) ?? VirtioRng()
        // vsock: the guest's queue addresses, sizes and features go to the kernel's vhost-vsock
        // at DRIVER_OK, so its configuration must be checked here first (rng where the host has
        // no /dev/vhost-vsock).
        case 3: device = (try? VirtioVsock(cid: 3 + UInt32(input[1]) + UInt32(input[3]) << 8, regions: ram.regions)) ?? VirtioRng()
                queue = Int(input[2] >> 5 & 1)
        case 2 where socketpair(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0, &tap) == 0:
            tap.forEach { _ = fcntl($0, F_SETFL, O_NONBLOCK) }
            device = VirtioNet(tapFD: tap[0], mac: [2, 0, 0, 0, 0, 1], offloads: true)
            queue = Int(input[2] >> 5 & 1)
            if input[2] & 16 != 0 { features |= VirtioNet.featureCsum | VirtioNet.featureHostTSO4 | VirtioNet.featureGuestCsum }
            if input[2] & 64 != 0 { features |= VirtioNet.featureMergeableRx }
            if queue == 0 {
                for cut in [Int(input[1]) * 7, Int(input[3]) * 13] {
                    let frame = Array(input.prefix(min(input.count, 12 + cut)))
                    _ = frame.withUnsafeBytes { send(tap[1], $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
                }
            }
        // The balloon with every feature: the inflate queue discards pages of this harness's
        // RAM, the reporting queue ranges of it, the stats queue is read when the timer asks.
        case 4: device = (try? VirtioBalloon(targetPages: UInt32(input[1]) << 4,
                                             options: .init(deflateOnOOM: true, statsInterval: 1, freePageReporting: true), memory: ram)) ?? VirtioRng()
                queue = Int(input[2] >> 5 & 3)
                features |= device.deviceFeatures
        default: device = VirtioRng()
        }
        guard let t = try? VirtioMMIOTransport(device: device, memory: ram, interrupt: NullLine()) else { return 0 }
        func w(_ off: UInt64, _ v: UInt32) { withUnsafeBytes(of: v) { t.write(offset: off, data: $0) } }
        let qsize = UInt32(1) << UInt32(input[1] % 10)
        if input[2] & 1 != 0 { features |= 1 << 29 }
        if input[2] & 2 != 0 { features |= 1 << 28 }
        w(0x70, 3); w(0x24, 0); w(0x20, UInt32(truncatingIfNeeded: features)); w(0x24, 1); w(0x20, UInt32(features >> 32))
        w(0x70, 11); w(0x30, UInt32(queue)); w(0x38, qsize)
        w(0x80, 0x1000); w(0x90, 0x1000 + 16 * qsize); w(0xa0, (0x1000 + 16 * qsize + 6 + 2 * qsize + 3) & ~3)
        w(0x44, 1); w(0x70, 15)

        let writes = Int(input[3] % 16)
        var cursor = 4
        for _ in 0..<writes where cursor + 8 <= input.count {
            let off = UInt64(input[cursor]) | UInt64(input[cursor + 1]) << 8
            let size = [1, 2, 4, 8][Int(input[cursor + 2] % 4)]
            let bytes = Array(input[(cursor + 4)..<(cursor + 8)]) + [0, 0, 0, 0]
            bytes.prefix(size).withUnsafeBytes { t.write(offset: off % 0x200, data: $0) }
            var out = [UInt8](repeating: 0, count: size)
            out.withUnsafeMutableBytes { t.read(offset: off % 0x200, data: $0) }
            cursor += 8
        }
        let rest = input[cursor...].prefix(Self.ramSize - 0x1000)
        try? ram.writeBytes(Array(rest), at: 0x1000)
        if input[2] & 8 != 0 { makePlausible(qsize: UInt64(qsize)) }
        t.notify(queue: queue)
        var served = 0
        // Each pass serves at most a batch; a few passes cover every chain the ring can hold.
        for _ in 0..<8 { served += t.processQueues() }
        // What the device sent to the tap is read and dropped, as a host would.
        var sink = [UInt8](repeating: 0, count: 1 << 16)
        while tap[1] >= 0, sink.withUnsafeMutableBytes({ recv(tap[1], $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }) > 0 {}
        return served
    }

    /// Clamps descriptors into RAM and indices into range, so the device parsers (not just the
    /// ring checks) see most inputs.
    private func makePlausible(qsize: UInt64) {
        for i in 0..<qsize {
            let d = GuestAddress(0x1000 + 16 * i)
            if let a: UInt64 = try? ram.read(at: d) { try? ram.write(0x10000 + a % 0xe0000, at: d) }
            if let l: UInt32 = try? ram.read(at: GuestAddress(d.rawValue + 8)) { try? ram.write(l % 0x2000, at: GuestAddress(d.rawValue + 8)) }
            if let n: UInt16 = try? ram.read(at: GuestAddress(d.rawValue + 14)) { try? ram.write(n % UInt16(qsize), at: GuestAddress(d.rawValue + 14)) }
        }
        let avail = 0x1000 + 16 * qsize
        if let idx: UInt16 = try? ram.read(at: GuestAddress(avail + 2)) { try? ram.write(idx % UInt16(qsize + 1), at: GuestAddress(avail + 2)) }
        for i in 0..<qsize {
            let e = GuestAddress(avail + 4 + 2 * i)
            if let h: UInt16 = try? ram.read(at: e) { try? ram.write(h % UInt16(qsize), at: e) }
        }
    }
}
