import CLinux
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import MicroVMCore
import Synchronization
import VMMAPI

/// virtio-balloon (virtio 1.2 §5.5): the host asks for guest memory back and the guest hands
/// over pages it will not touch, which the VMM discards (`MADV_DONTNEED`: the host frees them,
/// and a later guest access finds a zeroed page).
///
/// - inflate queue: page frame numbers (4 KiB, u32) the driver gave up: discarded;
/// - deflate queue: pages the driver takes back: counted (nothing to do for anonymous memory);
/// - stats queue: the driver's memory statistics, asked for every `statsInterval` seconds by
///   returning the buffer it holds here (its next buffer carries fresh values);
/// - reporting queue (free page reporting): ranges of free guest memory, discarded as they come.
///
/// The queue numbers follow the features the driver accepted (a driver without the stats queue
/// has its reporting queue at index 2). Every page frame number and range the guest hands over
/// is checked against guest RAM; what falls outside is counted and ignored.
public final class VirtioBalloon: VirtioDevice, Sendable {
    public static let featureMustTellHost: UInt64 = 1 << 0
    public static let featureStatsVQ: UInt64 = 1 << 1
    public static let featureDeflateOnOOM: UInt64 = 1 << 2
    public static let featurePageReporting: UInt64 = 1 << 5
    public static let pageSize: UInt64 = 4096
    /// At most this many PFNs or statistics are read from one buffer (Linux sends 256 PFNs).
    public static let maxPFNsPerRequest = 4096
    public static let maxStats = 32

    public struct Options: Sendable, Equatable {
        public var deflateOnOOM: Bool
        /// Seconds between statistics requests; 0: statistics are off.
        public var statsInterval: Int
        public var freePageReporting: Bool
        public init(deflateOnOOM: Bool = false, statsInterval: Int = 0, freePageReporting: Bool = false) {
            self.deflateOnOOM = deflateOnOOM; self.statsInterval = statsInterval; self.freePageReporting = freePageReporting
        }
    }

    /// The driver's statistics by the names Firecracker's `GET /balloon/statistics` uses, in tag order.
    static let statNames = BalloonStatistics.guestFields

    public struct Counters: Sendable, Equatable {
        public var inflatedPages: UInt64 = 0
        public var deflatedPages: UInt64 = 0
        public var reportedBytes: UInt64 = 0
        public var discardedBytes: UInt64 = 0
        /// PFNs or ranges outside guest RAM, and discards the host refused.
        public var rejected: UInt64 = 0
        public var statsUpdates: UInt64 = 0
    }

    struct State {
        var targetPages: UInt32
        var actualPages: UInt32 = 0
        var features: UInt64 = 0
        var stats: [String: UInt64] = [:]
        var statsAt: Double?
        var counters = Counters()
        var statsInterval: Int
        var statsWanted = false
    }

    public let options: Options
    let memory: any GuestMemory
    private let state: Mutex<State>
    /// Fires every `statsInterval` seconds: the I/O thread then returns the stats buffer.
    private let timer: Int32
    /// Tells the transport the config changed (a new target): set when the device is installed.
    private let configChanged = Mutex<(@Sendable () -> Void)?>(nil)

    public init(targetPages: UInt32 = 0, options: Options = Options(), memory: any GuestMemory) throws {
        guard options.statsInterval >= 0, options.statsInterval <= 86_400 else {
            throw MicroVMError.invalidArgument("balloon statistics interval \(options.statsInterval) s is out of range: use 0 (off) to 86400")
        }
        self.options = options
        self.memory = memory
        state = Mutex(State(targetPages: targetPages, statsInterval: options.statsInterval))
        timer = options.statsInterval > 0 ? makeTimerFD() : -1
        if options.statsInterval > 0 && timer < 0 {
            throw MicroVMError(.internalError, "timerfd for balloon statistics failed: \(String(cString: strerror(errno)))")
        }
        if timer >= 0 { armTimer(options.statsInterval, first: 0.001) }
    }

    deinit { if timer >= 0 { close(timer) } }

    public var deviceType: UInt32 { 5 }
    public var deviceFeatures: UInt64 {
        (options.deflateOnOOM ? Self.featureDeflateOnOOM : 0) | (options.statsInterval > 0 ? Self.featureStatsVQ : 0)
            | (options.freePageReporting ? Self.featurePageReporting : 0)
    }
    /// inflate, deflate, then stats and reporting where offered.
    public var queueMaxSizes: [UInt16] {
        [256, 256] + (options.statsInterval > 0 ? [1] : []) + (options.freePageReporting ? [256] : [])
    }

    /// num_pages (the target, the device's), actual (the driver's).
    public func config() -> [UInt8] {
        let (target, actual) = state.withLock { ($0.targetPages, $0.actualPages) }
        return withUnsafeBytes(of: target.littleEndian, Array.init) + withUnsafeBytes(of: actual.littleEndian, Array.init)
    }

    public func writeConfig(offset: Int, bytes: [UInt8]) {
        // Only `actual` (bytes 4...7) is the driver's; a partial write updates its bytes.
        state.withLock { s in
            var actual = withUnsafeBytes(of: s.actualPages.littleEndian, Array.init)
            for (i, b) in bytes.enumerated() where (4..<8).contains(offset + i) { actual[offset + i - 4] = b }
            s.actualPages = UInt32(littleEndian: actual.withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) })
        }
    }

    public func activate(_ activation: VirtioActivation) {
        state.withLock { $0.features = activation.features }
    }

    public func reset() {
        state.withLock { s in s.features = 0; s.actualPages = 0; s.statsWanted = false }
    }

    /// Which queue is which, from what the driver accepted.
    var statsQueue: Int? {
        let f = state.withLock { $0.features }
        return f & Self.featureStatsVQ != 0 ? 2 : nil
    }
    var reportingQueue: Int? {
        let f = state.withLock { $0.features }
        guard f & Self.featurePageReporting != 0 else { return nil }
        return f & Self.featureStatsVQ != 0 ? 3 : 2
    }

    public var deviceDrivenQueues: Set<Int> { statsQueue.map { [$0] } ?? [] }
    public var sourceFD: Int32 { timer }
    public var wantsSource: Bool { timer >= 0 }

    // MARK: control (the API thread)

    public var targetPages: UInt32 { state.withLock { $0.targetPages } }
    public var actualPages: UInt32 { state.withLock { $0.actualPages } }
    public var counters: Counters { state.withLock { $0.counters } }
    /// The driver's last statistics, by name, and when they came (monotonic seconds).
    public var statistics: (values: [String: UInt64], at: Double?) { state.withLock { ($0.stats, $0.statsAt) } }
    public var statsInterval: Int { state.withLock { $0.statsInterval } }

    /// Installs the transport's config-change signal (`VirtioMMIOTransport.configChanged`).
    public func onConfigChange(_ signal: @escaping @Sendable () -> Void) { configChanged.withLock { $0 = signal } }

    /// Asks the guest to hold `pages` 4 KiB pages in the balloon. At most the guest's RAM.
    public func setTarget(pages: UInt32) throws {
        let ram = (memory as? GuestRAM)?.size.bytes ?? memory.end.rawValue
        guard UInt64(pages) * Self.pageSize <= ram else {
            throw MicroVMError.invalidArgument("a balloon of \(ByteCount(UInt64(pages) * Self.pageSize)) is larger than the guest's \(ByteCount(ram)) of memory")
        }
        state.withLock { $0.targetPages = pages }
        configChanged.withLock { $0 }?()
    }

    /// A new statistics interval; only a device started with statistics on can change it (the
    /// stats queue is negotiated at boot), and not to 0.
    public func setStatsInterval(_ seconds: Int) throws {
        guard timer >= 0 else {
            throw MicroVMError.invalidArgument("balloon statistics were not enabled before boot (stats_polling_interval_s was 0): they cannot be turned on now")
        }
        guard seconds > 0, seconds <= 86_400 else {
            throw MicroVMError.invalidArgument("stats_polling_interval_s \(seconds) cannot be set on a running balloon: use 1...86400 (statistics cannot be turned off after boot)")
        }
        state.withLock { $0.statsInterval = seconds }
        armTimer(seconds, first: Double(seconds))
    }

    /// Every `seconds`, the first after `first` seconds. At boot the first request comes at once:
    /// the driver's first buffer holds its boot-time values.
    private func armTimer(_ seconds: Int, first: Double) { armTimerFD(timer, every: seconds, first: first) }

    // MARK: queues (the I/O thread)

    public func handle(queue: Int, chain: DescriptorChain, memory: any GuestMemory) throws -> UInt32 {
        if queue == 0 || queue == 1 {
            let bytes = try chain.readAll(memory: memory, limit: Self.maxPFNsPerRequest * 4)
            let pfns: [UInt32] = bytes.withUnsafeBytes { raw in
                (0..<(bytes.count / 4)).map { UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 4 * $0, as: UInt32.self)) }
            }
            if queue == 0 {
                let (discarded, rejected) = discard(ranges: Self.ranges(pfns))
                state.withLock { s in
                    s.counters.inflatedPages += UInt64(pfns.count)
                    s.counters.discardedBytes += discarded
                    s.counters.rejected += rejected
                }
            } else {
                state.withLock { $0.counters.deflatedPages += UInt64(pfns.count) }
            }
            return 0
        }
        if queue == reportingQueue {
            // Each writable segment is a run of free guest memory.
            let ranges = chain.writable.map { (start: $0.address.rawValue, length: UInt64($0.length)) }
            let (discarded, rejected) = discard(ranges: ranges)
            state.withLock { s in
                s.counters.reportedBytes += ranges.reduce(0) { $0 + $1.length }
                s.counters.discardedBytes += discarded
                s.counters.rejected += rejected
            }
        }
        return 0
    }

    public func pump(_ fill: VirtioQueueFiller) {
        var ticks: UInt64 = 0
        if timer >= 0, read(timer, &ticks, 8) == 8, ticks > 0 { state.withLock { $0.statsWanted = true } }
        guard let q = statsQueue, state.withLock({ $0.statsWanted }) else { return }
        let outcome = fill.fill(queue: q) { chain, memory in
            let bytes = try chain.readAll(memory: memory, limit: Self.maxStats * 10)
            var values: [String: UInt64] = [:]
            for i in stride(from: 0, to: bytes.count - bytes.count % 10, by: 10) {
                let (tag, v) = bytes.withUnsafeBytes { raw in
                    (Int(UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: i, as: UInt16.self))),
                     UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: i + 2, as: UInt64.self)))
                }
                if Self.statNames.indices.contains(tag) { values[Self.statNames[tag]] = v }
            }
            self.state.withLock { s in
                s.stats = values
                s.statsAt = Monotonic.seconds()
                s.counters.statsUpdates += 1
            }
            return 0
        }
        // Without a buffer (the driver has not refilled yet) the request waits for its kick.
        if outcome == .filled { state.withLock { $0.statsWanted = false } }
    }

    /// Contiguous runs of page frames, as (guest address, length).
    static func ranges(_ pfns: [UInt32]) -> [(start: UInt64, length: UInt64)] {
        var out: [(start: UInt64, length: UInt64)] = []
        for p in pfns.sorted() {
            let a = UInt64(p) * pageSize
            if let last = out.last, last.start + last.length == a { out[out.count - 1].length += pageSize }
            else if let last = out.last, a < last.start + last.length { continue }  // a repeat
            else { out.append((a, pageSize)) }
        }
        return out
    }

    /// Gives whole pages of each range back to the host. Returns the bytes discarded and the
    /// ranges refused (outside RAM, or the host said no, e.g. huge pages).
    func discard(ranges: [(start: UInt64, length: UInt64)]) -> (bytes: UInt64, rejected: UInt64) {
        var bytes: UInt64 = 0, rejected: UInt64 = 0
        for r in ranges {
            let start = (r.start + Self.pageSize - 1) & ~(Self.pageSize - 1)
            let (end, overflow) = r.start.addingReportingOverflow(r.length)
            guard !overflow else { rejected += 1; continue }
            let stop = end & ~(Self.pageSize - 1)
            guard stop > start, stop - start <= UInt64(Int.max),
                  let p = try? memory.hostPointer(at: GuestAddress(start), count: Int(stop - start)) else {
                rejected += 1
                continue
            }
            if madvise(p, Int(stop - start), MADV_DONTNEED) == 0 { bytes += stop - start } else { rejected += 1 }
        }
        return (bytes, rejected)
    }
}

/// timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC).
func makeTimerFD() -> Int32 {
    clinux_timerfd_create(Int32(CLOCK_MONOTONIC), Int32(O_CLOEXEC | O_NONBLOCK))
}

/// Arms a timerfd to fire every `seconds`, the first time after `first` seconds.
@discardableResult
func armTimerFD(_ fd: Int32, every seconds: Int, first: Double) -> Int32 {
    var its = itimerspec(it_interval: timespec(tv_sec: seconds, tv_nsec: 0),
                         it_value: timespec(tv_sec: Int(first), tv_nsec: Int((first - first.rounded(.down)) * 1e9)))
    return clinux_timerfd_settime(fd, 0, &its)
}
