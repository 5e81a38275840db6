import CLinux
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import MicroVMCore
import Synchronization

/// A virtio device behind a transport: its type, features, config space and request handling.
/// `handle` runs on the transport's I/O thread, never on a vCPU.
public protocol VirtioDevice: AnyObject, Sendable {
    var deviceType: UInt32 { get }
    /// Device-specific feature bits (the transport adds VERSION_1, EVENT_IDX, INDIRECT_DESC).
    var deviceFeatures: UInt64 { get }
    var queueMaxSizes: [UInt16] { get }
    /// The device config space (read at 0x100 onward).
    func config() -> [UInt8]
    /// Serves one chain; returns the bytes written into it. Throws only for a malformed request
    /// that the device cannot answer through its own status byte.
    func handle(queue: Int, chain: DescriptorChain, memory: any GuestMemory) throws -> UInt32

    /// Queues the device fills on its own (a NIC's receive queue). A notify on one of them only
    /// wakes the I/O thread; chains are taken by `pump` when the device has something to put in.
    var deviceDrivenQueues: Set<Int> { get }
    /// A descriptor whose readability means the device has work for `pump` (a tap with frames
    /// waiting), or -1. The I/O thread polls it only while `wantsSource` is true.
    var sourceFD: Int32 { get }
    /// False while the device holds work it cannot place (no buffers posted): polling the source
    /// then would spin, so the thread waits for the driver's next notify instead.
    var wantsSource: Bool { get }
    /// Moves pending work into the device-driven queues through `fill`; runs on the I/O thread.
    func pump(_ fill: VirtioQueueFiller)
    /// Queues served outside this process (by a vhost kernel worker): the transport neither
    /// drains their notify eventfds nor touches their rings.
    var offloadedQueues: Set<Int> { get }
    /// Eventfds that a worker outside the process signals when it used buffers: the I/O thread
    /// turns each signal into a used-buffer interrupt (so InterruptStatus says why).
    var callFDs: [Int32] { get }
    /// The driver set DRIVER_OK: what it accepted and where its queues are.
    func activate(_ activation: VirtioActivation)
    /// The driver reset the device: drop anything held for the old queues.
    func reset()
    /// The driver wrote `bytes` at `offset` of the config space (most config spaces are
    /// read-only: the write is ignored).
    func writeConfig(offset: Int, bytes: [UInt8])
}

extension VirtioDevice {
    public var deviceDrivenQueues: Set<Int> { [] }
    public var sourceFD: Int32 { -1 }
    public var wantsSource: Bool { false }
    public func pump(_ fill: VirtioQueueFiller) {}
    public var offloadedQueues: Set<Int> { [] }
    public var callFDs: [Int32] { [] }
    public func activate(_ activation: VirtioActivation) {}
    public func reset() {}
    public func writeConfig(offset: Int, bytes: [UInt8]) {}
}

/// What a device learns when the driver sets DRIVER_OK.
public struct VirtioActivation: Sendable {
    public struct Queue: Sendable, Equatable {
        public var ready: Bool
        public var size: UInt16
        public var descTable: UInt64, availRing: UInt64, usedRing: UInt64
    }
    public var features: UInt64
    public var queues: [Queue]
    /// Each queue's notify eventfd (registered with KVM_IOEVENTFD where KVM allows it).
    public var notifyFDs: [Int32]
}

/// What a device's `pump` gets: a way to take one chain of a queue, fill it, and hand it back.
public struct VirtioQueueFiller {
    public enum Outcome: Equatable, Sendable {
        case filled
        /// The driver has posted no buffer: keep the work and wait for its notify.
        case noBuffer
        /// The queue is not live (not ready, reset, or broken): the work cannot go anywhere.
        case unavailable
    }
    let spread: (Int, Int, Int, ([DescriptorChain], any GuestMemory) throws -> [UInt32]) -> Outcome
    /// Pops the next chain of `queue`, lets `body` write into it through the guest memory it is
    /// given (returning the bytes written) and adds it to the used ring. The interrupt follows
    /// when the pump returns.
    public func fill(queue: Int, _ body: (DescriptorChain, any GuestMemory) throws -> UInt32) -> Outcome {
        spread(queue, 0, 1) { chains, memory in [try body(chains[0], memory)] }
    }
    /// Pops as many chains of `queue` as it takes to hold `room` bytes (`maxChains` at most, and
    /// no more than the queue's size), lets
    /// `body` write across them (returning the bytes each got) and adds them all to the used ring
    /// at once. Until the driver has posted enough room, nothing is taken (`.noBuffer`); with
    /// `maxChains` chains that still fall short, `body` gets them and decides.
    public func fill(queue: Int, room: Int, maxChains: Int, _ body: ([DescriptorChain], any GuestMemory) throws -> [UInt32]) -> Outcome {
        spread(queue, room, maxChains, body)
    }
}

/// The virtio-mmio v2 register block (virtio 1.x §4.2.2) over one `VirtioDevice`.
///
/// Notifications: a QueueNotify write (or the vmm's ioeventfd, see `notifyEventFD`) signals an
/// eventfd; the transport's I/O thread drains the queues. Tests call `processQueues()` instead of
/// starting the thread.
public final class VirtioMMIOTransport: BusDevice, @unchecked Sendable {
    public static let magic: UInt32 = 0x7472_6976
    public static let notifyOffset: UInt64 = 0x50
    public static let featureVersion1: UInt64 = 1 << 32
    public static let featureEventIdx: UInt64 = 1 << 29
    public static let featureIndirect: UInt64 = 1 << 28
    public static let statusAcknowledge: UInt32 = 1, statusDriver: UInt32 = 2, statusDriverOK: UInt32 = 4
    public static let statusFeaturesOK: UInt32 = 8, statusNeedsReset: UInt32 = 64, statusFailed: UInt32 = 128
    /// Chains served per queue per wake-up before the others get a turn (back-pressure: the
    /// guest cannot keep the I/O thread on one queue, and at most this many requests are in flight).
    public static let batch = 64

    struct State {
        var status: UInt32 = 0
        var deviceFeaturesSel: UInt32 = 0
        var driverFeaturesSel: UInt32 = 0
        var driverFeatures: UInt64 = 0
        var queueSel: UInt32 = 0
        var queues: [Virtqueue]
        var interruptStatus: UInt32 = 0
        var configGeneration: UInt32 = 0
    }

    public let device: any VirtioDevice
    public let memory: any GuestMemory
    public let interrupt: any InterruptLine
    private let state: Mutex<State>
    /// One eventfd per queue: written on notify, read by the I/O thread.
    private let notifyFDs: [Int32]
    private let stopFD: Int32
    private let started = Mutex(false)
    private let finished = Atomic<Bool>(false)

    /// Malformed rings or chains seen (each marks the device DEVICE_NEEDS_RESET).
    public let malformed = Atomic<Int>(0)
    /// Notifies for a queue that is not ready, and register writes that made no sense.
    public let ignoredAccesses = Atomic<Int>(0)
    public let requestsServed = Atomic<Int>(0)
    public let interruptsRaised = Atomic<Int>(0)
    /// Bytes the device wrote into the guest's buffers (reads, received frames, entropy).
    public let bytesToGuest = Atomic<Int>(0)
    /// Kicks the driver gave (notify writes that reached the VMM, or ioeventfd counts drained).
    public let notifications = Atomic<Int>(0)
    /// QueueNotify writes that reached the transport as MMIO exits (none once the vmm has
    /// registered the notify eventfds with KVM_IOEVENTFD).
    public let notifyExits = Atomic<Int>(0)
    /// Times the I/O thread woke from poll (a spinning loop shows here).
    public let wakeups = Atomic<Int>(0)
    public private(set) var lastError: String? {
        get { lastErrorBox.withLock { $0 } }
        set { lastErrorBox.withLock { $0 = newValue } }
    }
    private let lastErrorBox = Mutex<String?>(nil)

    public init(device: any VirtioDevice, memory: any GuestMemory, interrupt: any InterruptLine) throws {
        self.device = device; self.memory = memory; self.interrupt = interrupt
        state = Mutex(State(queues: device.queueMaxSizes.map { Virtqueue(maxSize: $0) }))
        var fds: [Int32] = []
        for _ in 0...device.queueMaxSizes.count {
            let fd = makeVirtioEventFD()
            guard fd >= 0 else {
                fds.forEach { close($0) }
                throw MicroVMError(.internalError, "eventfd for a virtio queue failed: \(String(cString: strerror(errno))); raise the open-file limit")
            }
            fds.append(fd)
        }
        stopFD = fds.removeLast()
        notifyFDs = fds
    }

    deinit {
        stop()
        notifyFDs.forEach { close($0) }
        close(stopFD)
    }

    public var offeredFeatures: UInt64 {
        device.deviceFeatures | Self.featureVersion1 | Self.featureEventIdx | Self.featureIndirect
    }
    public var status: UInt32 { state.withLock { $0.status } }
    public var interruptStatus: UInt32 { state.withLock { $0.interruptStatus } }

    /// The eventfd behind queue `queue`'s notify: the vmm may register it with KVM_IOEVENTFD at
    /// `mmioBase + notifyOffset` (datamatch = queue) so a kick never leaves the kernel.
    public func notifyEventFD(queue: Int) -> Int32? { notifyFDs.indices.contains(queue) ? notifyFDs[queue] : nil }

    /// How many virtqueues the device has (one notify eventfd each).
    public var queueCount: Int { notifyFDs.count }

    // MARK: registers

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        for i in 0..<data.count { data[i] = 0 }
        if offset >= 0x100 {
            let cfg = device.config()
            for i in 0..<data.count {
                let o = offset - 0x100 + UInt64(i)
                if o < UInt64(cfg.count) { data[i] = cfg[Int(o)] }
            }
            return
        }
        guard data.count == 4, offset % 4 == 0 else { ignoredAccesses.add(1, ordering: .relaxed); return }
        let v: UInt32 = state.withLock { s in
            let q = s.queues.indices.contains(Int(s.queueSel)) ? s.queues[Int(s.queueSel)] : nil
            switch offset {
            case 0x000: return Self.magic
            case 0x004: return 2
            case 0x008: return device.deviceType
            case 0x00c: return 0x554d_4551  // "QEMU"-style vendor id; Linux ignores it
            case 0x010:
                return s.deviceFeaturesSel < 2 ? UInt32(truncatingIfNeeded: offeredFeatures >> (32 * UInt64(s.deviceFeaturesSel))) : 0
            case 0x034: return UInt32(q?.maxSize ?? 0)
            case 0x044: return q?.ready == true ? 1 : 0
            case 0x060: return s.interruptStatus
            case 0x070: return s.status
            case 0x0fc: return s.configGeneration
            default: return 0
            }
        }
        withUnsafeBytes(of: v.littleEndian) { data.copyMemory(from: $0) }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        if offset >= 0x100 {
            guard offset - 0x100 < 0x100 else { ignoredAccesses.add(1, ordering: .relaxed); return }
            device.writeConfig(offset: Int(offset - 0x100), bytes: Array(data))
            return
        }
        guard data.count == 4, offset % 4 == 0 else { ignoredAccesses.add(1, ordering: .relaxed); return }
        var raw: UInt32 = 0
        withUnsafeMutableBytes(of: &raw) { $0.copyMemory(from: data) }
        let v = UInt32(littleEndian: raw)
        if offset == Self.notifyOffset { notifyExits.add(1, ordering: .relaxed); notify(queue: Int(v)); return }
        var raise = false
        state.withLock { s in
            let qi = Int(s.queueSel)
            let hasQueue = s.queues.indices.contains(qi)
            // Queue registers may change only while the queue is off (§4.2.2.3).
            let queueWritable = hasQueue && !s.queues[qi].ready
            func setQueue(_ f: (inout Virtqueue) -> Void) {
                if queueWritable { f(&s.queues[qi]) } else { ignoredAccesses.add(1, ordering: .relaxed) }
            }
            func low(_ x: UInt64) -> UInt64 { (x & 0xffff_ffff_0000_0000) | UInt64(v) }
            func high(_ x: UInt64) -> UInt64 { (x & 0xffff_ffff) | (UInt64(v) << 32) }
            switch offset {
            case 0x014: s.deviceFeaturesSel = v
            case 0x020:
                if s.driverFeaturesSel < 2, s.status & Self.statusFeaturesOK == 0 {
                    let shift = 32 * UInt64(s.driverFeaturesSel)
                    s.driverFeatures = (s.driverFeatures & ~(0xffff_ffff << shift)) | (UInt64(v) << shift)
                } else { ignoredAccesses.add(1, ordering: .relaxed) }
            case 0x024: s.driverFeaturesSel = v
            case 0x030: s.queueSel = v
            case 0x038: setQueue { $0.size = UInt16(truncatingIfNeeded: min(v, 0x1_0000 - 1)) }
            case 0x044:
                guard hasQueue else { ignoredAccesses.add(1, ordering: .relaxed); return }
                if v == 0 { s.queues[qi].ready = false; return }
                guard !s.queues[qi].ready else { return }
                guard s.status & Self.statusFeaturesOK != 0 else {
                    ignoredAccesses.add(1, ordering: .relaxed); return
                }
                s.queues[qi].eventIndex = s.driverFeatures & Self.featureEventIdx != 0
                s.queues[qi].indirect = s.driverFeatures & Self.featureIndirect != 0
                do {
                    try s.queues[qi].validate(memory: memory)
                    s.queues[qi].ready = true
                } catch {
                    raise = markBroken(&s, error)
                }
            case 0x064: s.interruptStatus &= ~v
            case 0x070: raise = writeStatus(&s, v)
            case 0x080: setQueue { $0.descTable = low($0.descTable) }
            case 0x084: setQueue { $0.descTable = high($0.descTable) }
            case 0x090: setQueue { $0.availRing = low($0.availRing) }
            case 0x094: setQueue { $0.availRing = high($0.availRing) }
            case 0x0a0: setQueue { $0.usedRing = low($0.usedRing) }
            case 0x0a4: setQueue { $0.usedRing = high($0.usedRing) }
            default: ignoredAccesses.add(1, ordering: .relaxed)
            }
        }
        if raise { raiseInterrupt() }
    }

    private func writeStatus(_ s: inout State, _ v: UInt32) -> Bool {
        if v == 0 {
            // Reset: forget the negotiation and every queue. The notify eventfds are drained by
            // the I/O thread, which finds no ready queue.
            let gen = s.configGeneration
            s = State(queues: device.queueMaxSizes.map { Virtqueue(maxSize: $0) })
            s.configGeneration = gen &+ 1
            device.reset()
            return false
        }
        // The driver may only add bits (only a write of 0 clears them); NEEDS_RESET is the device's to set.
        var next = (v | s.status) & ~Self.statusNeedsReset
        if next & Self.statusFeaturesOK != 0, s.status & Self.statusFeaturesOK == 0 {
            let acceptable = s.driverFeatures & ~offeredFeatures == 0 && s.driverFeatures & Self.featureVersion1 != 0
            if !acceptable { next &= ~Self.statusFeaturesOK }
        }
        let wasLive = s.status & Self.statusDriverOK != 0
        s.status = next | (s.status & Self.statusNeedsReset)
        if !wasLive, s.status & Self.statusDriverOK != 0, s.status & Self.statusFeaturesOK != 0 {
            device.activate(VirtioActivation(
                features: s.driverFeatures,
                queues: s.queues.map { .init(ready: $0.ready, size: $0.size, descTable: $0.descTable, availRing: $0.availRing, usedRing: $0.usedRing) },
                notifyFDs: notifyFDs))
            // Buffers may be posted already and the source may hold work: let the thread look.
            for q in device.deviceDrivenQueues { notify(queue: q) }
        }
        return false
    }

    /// The device's config changed (a balloon's new target): a new generation and a
    /// configuration-change interrupt, once the driver is live.
    public func configChanged() {
        let live = state.withLock { s -> Bool in
            s.configGeneration &+= 1
            guard s.status & Self.statusDriverOK != 0 else { return false }
            s.interruptStatus |= 2
            return true
        }
        if live { raiseInterrupt() }
    }

    /// Marks the device broken (§2.1.2): NEEDS_RESET, a config-change interrupt, the queues off.
    private func markBroken(_ s: inout State, _ error: any Error) -> Bool {
        malformed.add(1, ordering: .relaxed)
        lastError = "\(error)"
        s.status |= Self.statusNeedsReset
        for i in s.queues.indices { s.queues[i].ready = false }
        s.interruptStatus |= 2
        s.configGeneration &+= 1
        return true
    }

    private func raiseInterrupt() {
        interruptsRaised.add(1, ordering: .relaxed)
        interrupt.trigger()
    }

    /// Records a kick. Cheap: the vCPU exit path only writes an eventfd.
    public func notify(queue: Int) {
        guard notifyFDs.indices.contains(queue) else { ignoredAccesses.add(1, ordering: .relaxed); return }
        var one: UInt64 = 1
        _ = Glibc.write(notifyFDs[queue], &one, 8)
    }

    // MARK: queue processing

    /// Serves every ready queue until it is empty (or a batch per queue). Returns chains served.
    /// The device's pump runs when `sourceReady` (its source has work) or when the driver kicked
    /// one of the device-driven queues (new buffers for held work), not on every other kick.
    @discardableResult
    public func processQueues(sourceReady: Bool = true) -> Int {
        var served = 0
        var drivenKicked = false
        let driven = device.deviceDrivenQueues, offloaded = device.offloadedQueues
        for qi in 0..<notifyFDs.count where !offloaded.contains(qi) {
            var count: UInt64 = 0
            // Drain the kick; the ring is looked at anyway.
            let kicked = Glibc.read(notifyFDs[qi], &count, 8) == 8
            if kicked { notifications.add(Int(truncatingIfNeeded: count), ordering: .relaxed) }
            if driven.contains(qi) { drivenKicked = drivenKicked || kicked } else { served += processQueue(qi) }
        }
        if !driven.isEmpty, sourceReady || drivenKicked { served += pumpDevice(driven) }
        return served
    }

    /// Lets the device fill its own queues, then interrupts once per queue that needs it.
    private func pumpDevice(_ driven: Set<Int>) -> Int {
        guard state.withLock({ $0.status & Self.statusDriverOK != 0 && $0.status & Self.statusNeedsReset == 0 }) else { return 0 }
        var served = 0
        device.pump(VirtioQueueFiller { qi, room, maxChains, body in
            let outcome = self.fill(qi, driven: driven, room: room, maxChains: maxChains, body)
            if outcome == .filled { served += 1 }
            return outcome
        })
        requestsServed.add(served, ordering: .relaxed)
        guard served > 0 else { return 0 }
        var raise = false
        state.withLock { s in
            for qi in driven where s.queues.indices.contains(qi) && s.queues[qi].ready {
                do {
                    if try s.queues[qi].needsInterrupt(memory: memory) { s.interruptStatus |= 1; raise = true }
                } catch {
                    raise = markBroken(&s, error) || raise
                }
            }
        }
        if raise { raiseInterrupt() }
        return served
    }

    /// Pops chains of a device-driven queue until they hold `room` bytes (one at least,
    /// `maxChains` at most), lets `body` write into them and uses them all at once; with too
    /// few posted, gives back what it popped and takes nothing.
    private func fill(_ qi: Int, driven: Set<Int>, room: Int, maxChains: Int,
                      _ body: ([DescriptorChain], any GuestMemory) throws -> [UInt32]) -> VirtioQueueFiller.Outcome {
        var outcome = VirtioQueueFiller.Outcome.unavailable
        var raise = false
        state.withLock { s in
            guard driven.contains(qi), s.status & Self.statusDriverOK != 0, s.status & Self.statusNeedsReset == 0,
                  s.queues.indices.contains(qi), s.queues[qi].ready else { return }
            do {
                // No more than the ring holds: a frame that even a full ring cannot take is for
                // `body` to refuse, not to wait for forever.
                var chains: [DescriptorChain] = [], total = 0
                let most = min(maxChains, Int(s.queues[qi].size))
                // Entries that came while the event was set are looked at again, at most a ring's
                // worth of times: a driver that keeps moving its index (back and forth, from
                // another vCPU) must not keep this thread, and the queue's lock, here.
                var looksAgain = Int(s.queues[qi].size)
                while chains.isEmpty || (total < room && chains.count < most) {
                    guard let chain = try s.queues[qi].pop(memory: memory) else {
                        // Too few posted: a kick is asked for at the driver's next entry, past
                        // those popped here, and what was popped is given back until then.
                        if try s.queues[qi].notifyOnNextAvail(memory: memory), looksAgain > 0 { looksAgain -= 1; continue }
                        s.queues[qi].unpop(chains.count)
                        outcome = .noBuffer
                        return
                    }
                    chains.append(chain)
                    total += chain.writableLength
                }
                let written: [UInt32]
                do { written = try body(chains, memory) } catch let e as VirtqueueError { throw e } catch { throw VirtqueueError.memory("\(error)") }
                var bytes = 0
                for (i, c) in chains.enumerated() {
                    let length = min(i < written.count ? written[i] : 0, UInt32(clamping: c.writableLength))
                    try s.queues[qi].stageUsed(head: c.head, length: length, memory: memory)
                    bytes += Int(length)
                }
                try s.queues[qi].publishUsed(memory: memory)
                bytesToGuest.add(bytes, ordering: .relaxed)
                outcome = .filled
            } catch {
                raise = markBroken(&s, error)
            }
        }
        if raise { raiseInterrupt() }
        return outcome
    }

    private func processQueue(_ qi: Int) -> Int {
        var served = 0
        var raise = false
        var more = false
        state.withLock { s in
            guard s.status & Self.statusDriverOK != 0, s.status & Self.statusNeedsReset == 0,
                  s.queues.indices.contains(qi), s.queues[qi].ready else {
                return
            }
            do {
                while served < Self.batch, let chain = try s.queues[qi].pop(memory: memory) {
                    let written: UInt32
                    do {
                        written = try device.handle(queue: qi, chain: chain, memory: memory)
                    } catch let e as VirtqueueError {
                        throw e
                    } catch {
                        throw VirtqueueError.memory("\(error)")
                    }
                    let used = min(written, UInt32(clamping: chain.writableLength))
                    try s.queues[qi].addUsed(head: chain.head, length: used, memory: memory)
                    bytesToGuest.add(Int(used), ordering: .relaxed)
                    served += 1
                }
                more = served == Self.batch
                if try s.queues[qi].needsInterrupt(memory: memory) {
                    s.interruptStatus |= 1
                    raise = true
                }
            } catch {
                raise = markBroken(&s, error)
            }
        }
        requestsServed.add(served, ordering: .relaxed)
        if raise { raiseInterrupt() }
        if more { notify(queue: qi) }  // come back after the other queues had their turn
        return served
    }

    // MARK: I/O thread

    /// Starts the I/O thread that serves queues on notify; `onThread` runs on it first. A call
    /// while it runs does nothing.
    public func start(name: String = "virtio", onThread: (@Sendable () -> Void)? = nil) throws(SystemCallError) {
        try started.withLock { (started: inout Bool) throws(SystemCallError) in
            guard !started else { return }
            try NativeThread.detach(name: name) { [unowned self] in
                onThread?()
                self.loop()
            }
            started = true
        }
    }

    private func loop() {
        let offloaded = device.offloadedQueues
        let kicks = notifyFDs.indices.filter { !offloaded.contains($0) }.map { notifyFDs[$0] }
        let calls = device.callFDs
        let base = ([stopFD] + calls + kicks).map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
        let source = device.sourceFD
        while true {
            // The source joins the set only while the device can place what it would read.
            // A device that is not live (before DRIVER_OK, after a reset, or broken) has no pump
            // to read its source, whose readiness would then wake this loop forever.
            var fds = base
            let polling = source >= 0 && device.wantsSource
                && state.withLock({ $0.status & Self.statusDriverOK != 0 && $0.status & Self.statusNeedsReset == 0 })
            if polling { fds.append(pollfd(fd: source, events: Int16(POLLIN), revents: 0)) }
            let r = poll(&fds, nfds_t(fds.count), -1)
            if r < 0 { if errno == EINTR { continue }; break }
            wakeups.add(1, ordering: .relaxed)
            if fds[0].revents != 0 { break }
            if fds[1..<(1 + calls.count)].contains(where: { $0.revents != 0 }) { relayCalls(calls) }
            processQueues(sourceReady: polling && fds[base.count].revents != 0)
        }
        finished.store(true, ordering: .releasing)
    }

    /// A vhost worker used buffers: drain its call eventfds and raise a used-buffer interrupt.
    private func relayCalls(_ calls: [Int32]) {
        var any = false
        for fd in calls {
            var count: UInt64 = 0
            if Glibc.read(fd, &count, 8) == 8, count > 0 { any = true }
        }
        guard any else { return }
        let live = state.withLock { s -> Bool in
            guard s.status & Self.statusDriverOK != 0 else { return false }
            s.interruptStatus |= 1
            return true
        }
        if live { raiseInterrupt() }
    }

    /// Stops and joins the I/O thread (idempotent).
    public func stop() {
        guard started.withLock({ $0 }) else { return }
        var one: UInt64 = 1
        _ = Glibc.write(stopFD, &one, 8)
        while !finished.load(ordering: .acquiring) { usleep(200) }
        started.withLock { $0 = false }
    }
}

/// A non-blocking eventfd for a queue's notifications or interrupt; -1 (errno set) on failure.
func makeVirtioEventFD() -> Int32 {
    // EFD_CLOEXEC | EFD_NONBLOCK (octal 02000000 | 04000, as O_CLOEXEC | O_NONBLOCK).
    clinux_eventfd(0, Int32(O_CLOEXEC | O_NONBLOCK))
}
