/// Split virtqueues (virtio 1.x §2.7) read and written through bounds-checked guest memory.
/// Every index, length and address comes from a hostile guest: each is validated, chains are
/// bounded by the queue size (a loop cannot spin), and any violation is a `VirtqueueError`
/// that the transport turns into DEVICE_NEEDS_RESET — never a trap.
///
/// ```swift
/// var q = Virtqueue(maxSize: 256)
/// q.size = 8; q.descTable = 0x1000; q.availRing = 0x2000; q.usedRing = 0x3000
/// try q.validate(memory: ram)
/// while let chain = try q.pop(memory: ram) { try q.addUsed(head: chain.head, length: 0, memory: ram) }
/// ```
import GuestMemory
import MicroVMCore
import Synchronization

/// Why a queue was refused. Each case names the guest's mistake.
public enum VirtqueueError: Error, Equatable, Sendable, CustomStringConvertible {
    case badRing(String)
    case availIndexJump(lastSeen: UInt16, published: UInt16)
    case headOutOfRange(UInt16)
    case descriptorOutOfRange(UInt16)
    case chainTooLong
    case nestedIndirect
    case badIndirectTable(length: UInt32)
    case bufferOutsideMemory(address: UInt64, length: UInt32)
    case readableAfterWritable
    case memory(String)

    public var description: String {
        switch self {
        case .badRing(let m): return "bad ring layout: \(m)"
        case .availIndexJump(let l, let p): return "available index jumped from \(l) to \(p), more than the queue size"
        case .headOutOfRange(let h): return "chain head \(h) is outside the descriptor table"
        case .descriptorOutOfRange(let d): return "descriptor next \(d) is outside the table"
        case .chainTooLong: return "descriptor chain longer than the queue (a loop?)"
        case .nestedIndirect: return "indirect descriptor inside an indirect table"
        case .badIndirectTable(let l): return "indirect table of \(l) bytes is empty, unaligned or too large"
        case .bufferOutsideMemory(let a, let l): return "buffer 0x\(String(a, radix: 16))+\(l) is outside guest RAM"
        case .readableAfterWritable: return "device-readable descriptor after a writable one"
        case .memory(let m): return m
        }
    }
}

/// One buffer of a chain, already checked to lie inside guest RAM.
public struct VirtqueueSegment: Sendable, Equatable {
    public let address: GuestAddress
    public let length: UInt32
    public let writable: Bool
}

/// A descriptor chain: readable segments first, then writable ones (enforced).
public struct DescriptorChain: Sendable {
    public let head: UInt16
    public let segments: [VirtqueueSegment]
    public var readable: [VirtqueueSegment] { segments.filter { !$0.writable } }
    public var writable: [VirtqueueSegment] { segments.filter { $0.writable } }
    public var readableLength: Int { readable.reduce(0) { $0 + Int($1.length) } }
    public var writableLength: Int { writable.reduce(0) { $0 + Int($1.length) } }

    /// Gathers up to `limit` readable bytes (the guest chooses the lengths; the device bounds them).
    public func readAll(memory: any GuestMemory, limit: Int) throws -> [UInt8] {
        var out: [UInt8] = []
        for s in readable {
            let n = min(Int(s.length), limit - out.count)
            if n <= 0 { break }
            out += try memory.readBytes(at: s.address, count: n)
        }
        return out
    }

    /// Scatters `bytes` over the writable segments starting `skip` bytes in; returns bytes written.
    @discardableResult
    public func write(_ bytes: [UInt8], skip: Int = 0, memory: any GuestMemory) throws -> Int {
        try write(bytes[...], skip: skip, memory: memory)
    }

    /// Scatters as much of `bytes` as fits over the writable segments starting `skip` bytes in;
    /// returns bytes written.
    @discardableResult
    public func write(_ bytes: ArraySlice<UInt8>, skip: Int = 0, memory: any GuestMemory) throws -> Int {
        let base = bytes.startIndex
        var done = 0, skip = skip
        for s in writable where done < bytes.count {
            var len = Int(s.length), addr = s.address.rawValue
            if skip >= len { skip -= len; continue }
            addr += UInt64(skip); len -= skip; skip = 0
            let n = min(len, bytes.count - done)
            try memory.writeBytes(bytes[(base + done)..<(base + done + n)], at: GuestAddress(addr))
            done += n
        }
        return done
    }
}

public struct Virtqueue: Sendable {
    public static let descNext: UInt16 = 1, descWrite: UInt16 = 2, descIndirect: UInt16 = 4
    /// Bound on one indirect table (the spec lets it reach the queue size; Linux stays far below).
    public static let maxIndirectEntries: UInt32 = 1024

    public let maxSize: UInt16
    public var size: UInt16
    public var ready = false
    public var descTable: UInt64 = 0
    public var availRing: UInt64 = 0
    public var usedRing: UInt64 = 0
    public var eventIndex = false
    public var indirect = false
    /// Next available-ring slot the device will read (free-running, wraps at 2^16).
    public private(set) var lastAvail: UInt16 = 0
    public private(set) var usedIndex: UInt16 = 0
    /// Used index at the last interrupt decision, for event-index suppression.
    private var signalledUsed: UInt16 = 0

    public init(maxSize: UInt16) { self.maxSize = maxSize; self.size = maxSize }

    public mutating func reset() {
        self = Virtqueue(maxSize: maxSize)
    }

    /// Checks the size and the three rings before the queue goes live.
    public func validate(memory: any GuestMemory) throws(VirtqueueError) {
        guard size > 0, size <= maxSize, size & (size - 1) == 0 else {
            throw .badRing("queue size \(size) is not a power of two in 1...\(maxSize)")
        }
        let n = UInt64(size)
        let parts: [(String, UInt64, UInt64, UInt64)] = [
            ("descriptor table", descTable, 16 * n, 16), ("available ring", availRing, 6 + 2 * n, 2), ("used ring", usedRing, 6 + 8 * n, 4)]
        for (name, addr, len, align) in parts {
            guard addr % align == 0 else { throw .badRing("\(name) at 0x\(String(addr, radix: 16)) is not \(align)-byte aligned") }
            guard memory.contains(GuestAddress(addr), count: Int(len)) else {
                throw .badRing("\(name) at 0x\(String(addr, radix: 16))+\(len) is outside guest RAM")
            }
        }
    }

    private func load<T: FixedWidthInteger>(_ memory: any GuestMemory, _ addr: UInt64, _: T.Type) throws(VirtqueueError) -> T {
        do { return try memory.read(at: GuestAddress(addr), as: T.self) } catch { throw .memory("\(error)") }
    }
    private func store<T: FixedWidthInteger>(_ memory: any GuestMemory, _ value: T, _ addr: UInt64) throws(VirtqueueError) {
        do { try memory.write(value, at: GuestAddress(addr)) } catch { throw .memory("\(error)") }
    }

    /// The driver's published available index.
    public func availIndex(memory: any GuestMemory) throws(VirtqueueError) -> UInt16 {
        try load(memory, availRing + 2, UInt16.self)
    }

    /// Takes the next chain, or nil when the driver has published nothing new.
    public mutating func pop(memory: any GuestMemory) throws(VirtqueueError) -> DescriptorChain? {
        let published = try availIndex(memory: memory)
        let pending = published &- lastAvail
        guard pending != 0 else { return nil }
        guard pending <= size else { throw .availIndexJump(lastSeen: lastAvail, published: published) }
        let slot = UInt64(lastAvail % size)
        let head = try load(memory, availRing + 4 + 2 * slot, UInt16.self)
        guard head < size else { throw .headOutOfRange(head) }
        let chain = try walk(memory: memory, head: head)
        lastAvail &+= 1
        if eventIndex { try store(memory, lastAvail, usedRing + 4 + 8 * UInt64(size)) }
        return chain
    }

    private func walk(memory: any GuestMemory, head: UInt16) throws(VirtqueueError) -> DescriptorChain {
        var segments: [VirtqueueSegment] = []
        var table = descTable, tableSize = UInt32(size), index = UInt32(head)
        var budget = UInt32(size), inIndirect = false, seenWritable = false
        while true {
            guard budget > 0 else { throw .chainTooLong }
            budget -= 1
            let d = table + 16 * UInt64(index)
            let addr = try load(memory, d, UInt64.self)
            let len = try load(memory, d + 8, UInt32.self)
            let flags = try load(memory, d + 12, UInt16.self)
            let next = try load(memory, d + 14, UInt16.self)
            if flags & Self.descIndirect != 0 {
                guard indirect, !inIndirect else { throw .nestedIndirect }
                guard len >= 16, len % 16 == 0, len / 16 <= Self.maxIndirectEntries else { throw .badIndirectTable(length: len) }
                guard memory.contains(GuestAddress(addr), count: Int(len)) else {
                    throw .bufferOutsideMemory(address: addr, length: len)
                }
                // The indirect descriptor ends the outer chain (§2.7.5.3.1): its NEXT is ignored.
                table = addr; tableSize = len / 16; index = 0; budget = tableSize; inIndirect = true
                continue
            }
            guard len == 0 || memory.contains(GuestAddress(addr), count: Int(len)) else {
                throw .bufferOutsideMemory(address: addr, length: len)
            }
            let writable = flags & Self.descWrite != 0
            if !writable && seenWritable { throw .readableAfterWritable }
            seenWritable = seenWritable || writable
            if len > 0 { segments.append(VirtqueueSegment(address: GuestAddress(addr), length: len, writable: writable)) }
            guard flags & Self.descNext != 0 else { break }
            guard UInt32(next) < tableSize else { throw .descriptorOutOfRange(next) }
            index = UInt32(next)
        }
        return DescriptorChain(head: head, segments: segments)
    }

    /// Returns a chain to the driver with `length` bytes written into it.
    public mutating func addUsed(head: UInt16, length: UInt32, memory: any GuestMemory) throws(VirtqueueError) {
        try stageUsed(head: head, length: length, memory: memory)
        try publishUsed(memory: memory)
    }

    /// Writes a used element without publishing it: several chains staged one after another
    /// reach the driver together at `publishUsed`, so a driver polling the ring sees all of
    /// them or none (a frame spread over several buffers).
    public mutating func stageUsed(head: UInt16, length: UInt32, memory: any GuestMemory) throws(VirtqueueError) {
        let slot = UInt64(usedIndex % size)
        try store(memory, UInt32(head), usedRing + 4 + 8 * slot)
        try store(memory, length, usedRing + 8 + 8 * slot)
        usedIndex &+= 1
    }

    /// Publishes the elements staged since the last publication.
    public mutating func publishUsed(memory: any GuestMemory) throws(VirtqueueError) {
        // The elements must be visible before the index that publishes them.
        atomicFence()
        try store(memory, usedIndex, usedRing + 2)
    }

    /// Gives back the last `count` chains popped and not used: the next pops return them again.
    /// The available event stays where `pop` or `notifyOnNextAvail` left it: moved back to the
    /// given-back entries, which the driver published long ago, it would ask for a kick the
    /// driver has already gone past, and none would come.
    public mutating func unpop(_ count: Int) {
        lastAvail &-= UInt16(truncatingIfNeeded: count)
    }

    /// Asks the driver to kick when it publishes its next available entry, past every entry it has
    /// published now (with EVENT_IDX; without it the driver kicks on every entry anyway). Returns
    /// whether more entries came meanwhile, for which no kick will come: look at the ring again.
    public mutating func notifyOnNextAvail(memory: any GuestMemory) throws(VirtqueueError) -> Bool {
        guard eventIndex else { return false }
        let published = try availIndex(memory: memory)
        try store(memory, published, usedRing + 4 + 8 * UInt64(size))
        atomicFence()
        return try availIndex(memory: memory) != published
    }

    /// Whether the driver wants an interrupt for the used entries added since the last call.
    public mutating func needsInterrupt(memory: any GuestMemory) throws(VirtqueueError) -> Bool {
        atomicFence()
        let old = signalledUsed, new = usedIndex
        signalledUsed = new
        guard old != new else { return false }
        if eventIndex {
            let usedEvent = try load(memory, availRing + 4 + 2 * UInt64(size), UInt16.self)
            return (new &- usedEvent &- 1) < (new &- old)
        }
        let flags = try load(memory, availRing, UInt16.self)
        return flags & 1 == 0
    }
}

/// Orders our ring stores against the guest's vCPUs, which read them concurrently.
@inline(__always) func atomicFence() { atomicMemoryFence(ordering: .sequentiallyConsistent) }
