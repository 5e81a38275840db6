import CVhost
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import MicroVMCore
import Synchronization

/// virtio-vsock (virtio 1.x §5.10) served by the host kernel's vhost-vsock: the receive and
/// transmit queues (0 and 1) run in a vhost worker, which reads the queues' notify eventfds
/// (KVM signals them on a QueueNotify write) and signals call eventfds that the transport turns
/// into interrupts. The event queue (2) stays here; it only ever holds the driver's buffers,
/// since this device never resets a guest's connections behind its back.
///
/// A host program reaches the guest with an `AF_VSOCK` socket to (`cid`, port); the guest
/// reaches the host at CID 2.
public final class VirtioVsock: VirtioDevice, @unchecked Sendable {
    /// virtio-vsock's device type.
    public static let type: UInt32 = 19
    public static let hostCID: UInt32 = 2
    /// CIDs 0-2 are the hypervisor, the local and the host addresses; u32 max is "any".
    public static func isValidGuestCID(_ cid: UInt32) -> Bool { cid > 2 && cid != UInt32.max }

    public let cid: UInt64
    private let vhost: Int32
    private let regions: [MemoryRegion]
    private let calls: [Int32]
    private let hostFeatures: UInt64
    private let running = Mutex(false)
    /// Why the last activation failed, if it did (the guest then sees a dead device).
    public private(set) var activationError: String? {
        get { errorBox.withLock { $0 } }
        set { errorBox.withLock { $0 = newValue } }
    }
    private let errorBox = Mutex<String?>(nil)

    /// Opens /dev/vhost-vsock for guest CID `cid` over the guest RAM `regions`.
    public init(cid: UInt32, regions: [MemoryRegion], device: String = "/dev/vhost-vsock") throws {
        guard Self.isValidGuestCID(cid) else {
            throw MicroVMError.invalidArgument("vsock CID \(cid) is reserved (0-2 and 4294967295 are not guest addresses): pick a CID of 3 or more")
        }
        let fd = open(device, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else {
            let why = String(cString: strerror(errno))
            throw MicroVMError(.unsupported, "cannot open \(device): \(why); load the vhost_vsock module (modprobe vhost_vsock) and run as root")
        }
        var calls: [Int32] = []
        func fail(_ what: String) -> MicroVMError {
            let e = errno
            calls.forEach { close($0) }
            close(fd)
            if e == EADDRINUSE { return MicroVMError.invalidArgument("vsock CID \(cid) is already used by another VM on this host: pick another --vsock CID") }
            return MicroVMError(.backend, "vhost-vsock \(what) failed: \(String(cString: strerror(e)))")
        }
        guard ioctl(fd, CVHOST_SET_OWNER, CInt(0)) == 0 else { throw fail("SET_OWNER") }
        var features: UInt64 = 0
        guard withUnsafeMutableBytes(of: &features, { ioctl(fd, CVHOST_GET_FEATURES, $0.baseAddress!) }) == 0 else { throw fail("GET_FEATURES") }
        var guestCID = UInt64(cid)
        guard withUnsafeMutableBytes(of: &guestCID, { ioctl(fd, CVHOST_VSOCK_SET_GUEST_CID, $0.baseAddress!) }) == 0 else { throw fail("SET_GUEST_CID \(cid)") }
        for _ in 0..<2 {
            let e = makeVirtioEventFD()
            guard e >= 0 else { throw fail("eventfd") }
            calls.append(e)
        }
        self.cid = UInt64(cid); self.vhost = fd; self.regions = regions; self.calls = calls; self.hostFeatures = features
    }

    deinit {
        stopWorker()
        calls.forEach { close($0) }
        close(vhost)
    }

    public var deviceType: UInt32 { Self.type }
    public var queueMaxSizes: [UInt16] { [256, 256, 64] }
    /// No vsock-specific bits (no SEQPACKET); the transport adds VERSION_1, EVENT_IDX and
    /// INDIRECT_DESC, which the vhost worker must support too (checked at activation).
    public var deviceFeatures: UInt64 { 0 }
    public func config() -> [UInt8] { withUnsafeBytes(of: cid.littleEndian) { Array($0) } }
    public var offloadedQueues: Set<Int> { [0, 1] }
    public var callFDs: [Int32] { calls }
    /// The event queue: the driver's buffers stay posted (nothing pumps them), as no event is sent.
    public var deviceDrivenQueues: Set<Int> { [2] }

    /// Never called: queues 0 and 1 belong to the vhost worker and 2 is never taken from.
    public func handle(queue: Int, chain: DescriptorChain, memory: any GuestMemory) throws -> UInt32 { 0 }

    /// Hands the queues to the vhost worker and starts it.
    public func activate(_ a: VirtioActivation) {
        do {
            try configureWorker(a)
            activationError = nil
        } catch {
            activationError = "\(error)"
            stopWorker()
        }
    }

    public func reset() { stopWorker() }

    private func configureWorker(_ a: VirtioActivation) throws {
        func check(_ r: Int32, _ what: String) throws {
            guard r == 0 else { throw MicroVMError(.backend, "vhost-vsock \(what) failed: \(String(cString: strerror(errno)))") }
        }
        guard a.queues.count >= 2, a.notifyFDs.count >= 2, a.queues[0].ready, a.queues[1].ready else {
            throw MicroVMError(.guestError, "the driver did not enable the vsock rx and tx queues")
        }
        var features = a.features & hostFeatures
        guard features == a.features else {
            throw MicroVMError(.backend, "vhost-vsock cannot serve features 0x\(String(a.features & ~hostFeatures, radix: 16)) the driver accepted")
        }
        try check(withUnsafeMutableBytes(of: &features) { ioctl(vhost, CVHOST_SET_FEATURES, $0.baseAddress!) }, "SET_FEATURES")
        try setMemoryTable(check)
        for q in 0..<2 {
            let layout = a.queues[q]
            var num = vhost_vring_state(index: UInt32(q), num: UInt32(layout.size))
            try check(withUnsafeMutableBytes(of: &num) { ioctl(vhost, CVHOST_SET_VRING_NUM, $0.baseAddress!) }, "SET_VRING_NUM")
            var base = vhost_vring_state(index: UInt32(q), num: 0)
            try check(withUnsafeMutableBytes(of: &base) { ioctl(vhost, CVHOST_SET_VRING_BASE, $0.baseAddress!) }, "SET_VRING_BASE")
            var addr = vhost_vring_addr()
            addr.index = UInt32(q)
            addr.desc_user_addr = try hostAddress(layout.descTable, Int(layout.size) * 16)
            addr.avail_user_addr = try hostAddress(layout.availRing, 6 + Int(layout.size) * 2)
            addr.used_user_addr = try hostAddress(layout.usedRing, 6 + Int(layout.size) * 8)
            try check(withUnsafeMutableBytes(of: &addr) { ioctl(vhost, CVHOST_SET_VRING_ADDR, $0.baseAddress!) }, "SET_VRING_ADDR")
            var kick = vhost_vring_file(index: UInt32(q), fd: a.notifyFDs[q])
            try check(withUnsafeMutableBytes(of: &kick) { ioctl(vhost, CVHOST_SET_VRING_KICK, $0.baseAddress!) }, "SET_VRING_KICK")
            var call = vhost_vring_file(index: UInt32(q), fd: calls[q])
            try check(withUnsafeMutableBytes(of: &call) { ioctl(vhost, CVHOST_SET_VRING_CALL, $0.baseAddress!) }, "SET_VRING_CALL")
        }
        var on: Int32 = 1
        try check(withUnsafeMutableBytes(of: &on) { ioctl(vhost, CVHOST_VSOCK_SET_RUNNING, $0.baseAddress!) }, "SET_RUNNING")
        running.withLock { $0 = true }
    }

    /// The ring at `guest` as a host address, checked to lie inside one region.
    private func hostAddress(_ guest: UInt64, _ count: Int) throws -> UInt64 {
        let (end, overflow) = guest.addingReportingOverflow(UInt64(count))
        for r in regions where !overflow && guest >= r.guestBase.rawValue && end <= r.guestEnd {
            return UInt64(UInt(bitPattern: r.host)) + (guest - r.guestBase.rawValue)
        }
        throw MicroVMError(.guestError, "vsock ring 0x\(String(guest, radix: 16))+\(count) is outside guest RAM")
    }

    /// VHOST_SET_MEM_TABLE: every guest RAM region with its host mapping.
    private func setMemoryTable(_ check: (Int32, String) throws -> Void) throws {
        let header = Int(CVHOST_MEMORY_REGIONS_OFFSET)
        let entry = MemoryLayout<vhost_memory_region>.stride
        let buf = UnsafeMutableRawPointer.allocate(byteCount: header + entry * regions.count, alignment: 8)
        defer { buf.deallocate() }
        buf.initializeMemory(as: UInt8.self, repeating: 0, count: header + entry * regions.count)
        buf.storeBytes(of: UInt32(regions.count), as: UInt32.self)  // nregions, then padding
        for (i, r) in regions.enumerated() {
            let region = vhost_memory_region(guest_phys_addr: r.guestBase.rawValue, memory_size: r.size,
                                             userspace_addr: UInt64(UInt(bitPattern: r.host)), flags_padding: 0)
            buf.storeBytes(of: region, toByteOffset: header + i * entry, as: vhost_memory_region.self)
        }
        try check(ioctl(vhost, CVHOST_SET_MEM_TABLE, buf), "SET_MEM_TABLE")
    }

    /// Stops the worker (idempotent): connections end, the rings stay the guest's.
    private func stopWorker() {
        running.withLock { on in
            guard on else { return }
            var off: Int32 = 0
            _ = withUnsafeMutableBytes(of: &off) { ioctl(vhost, CVHOST_VSOCK_SET_RUNNING, $0.baseAddress!) }
            on = false
        }
    }
}
