import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import MicroVMCore
import Synchronization

/// virtio-net (virtio 1.x §5.1) over a tap descriptor opened with IFF_VNET_HDR and a 12-byte
/// header size: queue 0 receives, queue 1 transmits, no control queue.
///
/// Frames cross the tap with their virtio-net header as they are, so checksum and segmentation
/// offloads cost nothing to support: the transmit header goes to the host kernel, which checks
/// it, and the receive header comes from the host kernel, which honours the offloads the guest
/// accepted (`TapDevice.setOffloads`). A transmit header asking for an offload the guest did not
/// negotiate is refused (the frame is dropped and counted), as is a frame of the wrong size.
///
/// Receive: a frame read from the tap waits in `pending` until the guest posts a buffer; while
/// it waits, the tap is not polled, so the host kernel queues (and past its limit drops) further
/// frames — back-pressure without a busy loop.
public final class VirtioNet: VirtioDevice, @unchecked Sendable {
    public static let featureCsum: UInt64 = 1 << 0, featureGuestCsum: UInt64 = 1 << 1
    public static let featureMAC: UInt64 = 1 << 5
    public static let featureGuestTSO4: UInt64 = 1 << 7, featureGuestTSO6: UInt64 = 1 << 8
    public static let featureHostTSO4: UInt64 = 1 << 11, featureHostTSO6: UInt64 = 1 << 12
    /// The driver posts page-sized buffers and a frame spreads over as many as it needs
    /// (num_buffers in its header), instead of every buffer being big enough for 64 KiB.
    public static let featureMergeableRx: UInt64 = 1 << 15
    public static let featureStatus: UInt64 = 1 << 16
    public static let headerSize = 12
    /// Largest frame either way: a 64 KiB segment plus its Ethernet header, after the virtio header.
    public static let maxFrame = 65_536 + 14
    /// Frames moved into the guest per pump before the transmit queue gets a turn.
    public static let receiveBatch = 128
    static let gsoNone: UInt8 = 0, gsoTCPv4: UInt8 = 1, gsoTCPv6: UInt8 = 4, headerNeedsCsum: UInt8 = 1

    public let mac: [UInt8]
    public let offloads: Bool
    private let fd: Int32
    /// Called once with the TUN_F_* bits the guest accepted (the owner of the tap applies them).
    private let applyOffloads: @Sendable (UInt32) -> Bool

    struct Receive {
        var pending: [UInt8]?
        var waitingForBuffers = false
        var sourceDead = false
        var features: UInt64 = 0
    }
    private let rx = Mutex(Receive())
    /// Where frames are read from the tap; only the I/O thread's pump touches it.
    private let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: VirtioNet.headerSize + VirtioNet.maxFrame, alignment: 16)
    public let framesReceived = Atomic<Int>(0)
    public let framesSent = Atomic<Int>(0)
    /// Frames refused or lost: malformed transmit headers, short buffers, tap write errors.
    public let framesDropped = Atomic<Int>(0)

    /// `fd`: a non-blocking tap with a 12-byte vnet header; the caller keeps it open until the
    /// device's transport has stopped. `offloads: false` offers no checksum or TSO features.
    public init(tapFD fd: Int32, mac: [UInt8], offloads: Bool = true,
                applyOffloads: @escaping @Sendable (UInt32) -> Bool = { _ in true }) {
        precondition(mac.count == 6, "a MAC address has 6 bytes")
        self.fd = fd; self.mac = mac; self.offloads = offloads; self.applyOffloads = applyOffloads
    }

    public var deviceType: UInt32 { 1 }
    public var queueMaxSizes: [UInt16] { [256, 256] }
    public var deviceFeatures: UInt64 {
        var f = Self.featureMAC | Self.featureStatus | Self.featureMergeableRx
        if offloads {
            f |= Self.featureCsum | Self.featureGuestCsum | Self.featureHostTSO4 | Self.featureHostTSO6
                | Self.featureGuestTSO4 | Self.featureGuestTSO6
        }
        return f
    }

    /// mac[6], status (LINK_UP).
    public func config() -> [UInt8] { mac + [1, 0] }

    public var deviceDrivenQueues: Set<Int> { [0] }
    public var sourceFD: Int32 { fd }
    public var wantsSource: Bool { rx.withLock { !$0.waitingForBuffers && !$0.sourceDead } }

    public func activate(_ activation: VirtioActivation) {
        let features = activation.features
        var bits: UInt32 = 0
        if features & Self.featureGuestCsum != 0 {
            bits |= TapDevice.offloadCsum
            if features & Self.featureGuestTSO4 != 0 { bits |= TapDevice.offloadTSO4 }
            if features & Self.featureGuestTSO6 != 0 { bits |= TapDevice.offloadTSO6 }
        }
        let applied = applyOffloads(bits)
        rx.withLock {
            // A tap that refused the offloads would send frames the guest cannot take: accept none.
            $0.features = applied ? features : features & ~(Self.featureGuestCsum | Self.featureGuestTSO4 | Self.featureGuestTSO6)
            $0.waitingForBuffers = false
        }
    }

    public func reset() {
        rx.withLock { $0.pending = nil; $0.waitingForBuffers = false; $0.features = 0 }
    }

    // MARK: transmit

    public func handle(queue: Int, chain: DescriptorChain, memory: any GuestMemory) throws -> UInt32 {
        guard queue == 1 else { return 0 }  // the receive queue is filled by pump
        let length = chain.readableLength
        guard length > Self.headerSize, length <= Self.headerSize + Self.maxFrame else {
            framesDropped.add(1, ordering: .relaxed); return 0
        }
        var frame = try chain.readAll(memory: memory, limit: length)
        guard frame.count == length, headerAllowed(&frame) else { framesDropped.add(1, ordering: .relaxed); return 0 }
        let n = frame.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        if n == length { framesSent.add(1, ordering: .relaxed) } else { framesDropped.add(1, ordering: .relaxed) }
        return 0
    }

    /// Checks a transmit header against what the guest negotiated; clears num_buffers.
    func headerAllowed(_ frame: inout [UInt8]) -> Bool {
        let features = rx.withLock { $0.features }
        let flags = frame[0], gso = frame[1] & 0x7f
        if flags & Self.headerNeedsCsum != 0, features & Self.featureCsum == 0 { return false }
        switch gso {
        case Self.gsoNone: break
        case Self.gsoTCPv4: if features & Self.featureHostTSO4 == 0 { return false }
        case Self.gsoTCPv6: if features & Self.featureHostTSO6 == 0 { return false }
        default: return false
        }
        if frame[1] & 0x80 != 0 { return false }  // ECN was never offered
        frame[10] = 0; frame[11] = 0
        return true
    }

    // MARK: receive

    public func pump(_ fill: VirtioQueueFiller) {
        let mergeable = rx.withLock { $0.features } & Self.featureMergeableRx != 0
        var moved = 0
        while moved < Self.receiveBatch {
            let frame: [UInt8]
            if let held = rx.withLock({ $0.pending }) {
                frame = held
            } else {
                guard let next = readFrame() else { return }
                frame = next
            }
            var tooBig = false
            let outcome: VirtioQueueFiller.Outcome
            if mergeable {
                // num_buffers is 16 bits; the transport takes no more chains than the ring holds.
                outcome = fill.fill(queue: 0, room: frame.count, maxChains: Int(UInt16.max)) { chains, memory in
                    guard chains.reduce(0, { $0 + $1.writableLength }) >= frame.count else {
                        tooBig = true
                        return chains.map { _ in 0 }
                    }
                    var written: [UInt32] = [], offset = 0
                    for chain in chains {
                        let n = try chain.write(frame[offset...], memory: memory)
                        written.append(UInt32(n)); offset += n
                    }
                    // num_buffers (the header's last field, in the first buffer): how many it took.
                    let count = UInt16(chains.count)
                    try chains[0].write([UInt8(truncatingIfNeeded: count), UInt8(count >> 8)], skip: 10, memory: memory)
                    return written
                }
            } else {
                outcome = fill.fill(queue: 0) { chain, memory in
                    guard chain.writableLength >= frame.count else { tooBig = true; return 0 }
                    return UInt32(try chain.write(frame, memory: memory))
                }
            }
            switch outcome {
            case .filled:
                rx.withLock { $0.pending = nil; $0.waitingForBuffers = false }
                if tooBig { framesDropped.add(1, ordering: .relaxed) } else { framesReceived.add(1, ordering: .relaxed) }
                moved += 1
            case .noBuffer:
                rx.withLock { $0.pending = frame; $0.waitingForBuffers = true }
                return
            case .unavailable:
                rx.withLock { $0.pending = nil }
                framesDropped.add(1, ordering: .relaxed)
                return
            }
        }
    }

    deinit { scratch.deallocate() }

    /// One frame from the tap with num_buffers set to 1, or nil when none is waiting.
    private func readFrame() -> [UInt8]? {
        while true {
            let n = read(fd, scratch.baseAddress, scratch.count)
            if n > Self.headerSize {
                var frame = Array(UnsafeRawBufferPointer(rebasing: scratch[0..<n]))
                frame[10] = 1; frame[11] = 0
                return frame
            }
            if n < 0, errno == EINTR { continue }
            if n < 0, errno != EAGAIN, errno != EWOULDBLOCK { rx.withLock { $0.sourceDead = true } }
            return nil
        }
    }
}
