/// GuestMemory: the guest's RAM as the VMM sees it — anonymous host mappings placed at guest
/// physical addresses, with bounds-checked typed reads and writes. Knows nothing of KVM.
///
/// ```swift
/// let mem = try GuestRAM(size: .mebibytes(128))
/// try mem.write(UInt32(0x53726448), at: GuestAddress(0x7000 + 0x202))
/// let magic: UInt32 = try mem.read(at: GuestAddress(0x7202))
/// ```
import MicroVMCore
#if canImport(Glibc)
import Glibc
#endif

/// A guest physical address.
public struct GuestAddress: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible, ExpressibleByIntegerLiteral {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ v: UInt64) { self.rawValue = v }
    public init(integerLiteral v: UInt64) { self.rawValue = v }
    public static func < (a: GuestAddress, b: GuestAddress) -> Bool { a.rawValue < b.rawValue }
    /// Adds an offset; nil on overflow (guest-supplied addresses must never trap).
    public func adding(_ n: UInt64) -> GuestAddress? {
        let (r, o) = rawValue.addingReportingOverflow(n)
        return o ? nil : GuestAddress(r)
    }
    public var description: String { "0x" + String(rawValue, radix: 16) }
}

/// The consumer-side interface every loader and device uses. Implementations check every access.
public protocol GuestMemory: AnyObject, Sendable {
    /// Highest guest address + 1 of any RAM region.
    var end: GuestAddress { get }
    /// Host pointer to `count` bytes at `address`, if they lie inside one region.
    func hostPointer(at address: GuestAddress, count: Int) throws -> UnsafeMutableRawPointer
}

/// Thrown for an access outside guest RAM. Guest-controlled addresses produce this, never a trap.
public struct GuestMemoryError: Error, CustomStringConvertible, Sendable, Equatable {
    public let address: GuestAddress
    public let count: Int
    public var description: String { "guest memory access of \(count) bytes at \(address) is outside guest RAM" }
}

extension GuestMemory {
    public func read(into buffer: UnsafeMutableRawBufferPointer, at address: GuestAddress) throws {
        guard buffer.count > 0 else { return }
        let p = try hostPointer(at: address, count: buffer.count)
        // SAFETY: hostPointer checked that [address, address+count) lies in one mapped region.
        buffer.baseAddress!.copyMemory(from: p, byteCount: buffer.count)
    }

    public func write(_ bytes: UnsafeRawBufferPointer, at address: GuestAddress) throws {
        guard bytes.count > 0 else { return }
        let p = try hostPointer(at: address, count: bytes.count)
        // SAFETY: as above; the region is writable anonymous memory.
        p.copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
    }

    public func readBytes(at address: GuestAddress, count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { try read(into: $0, at: address) }
        return out
    }

    public func writeBytes(_ bytes: some Collection<UInt8>, at address: GuestAddress) throws {
        try Array(bytes).withUnsafeBytes { try write($0, at: address) }
    }

    /// Reads a little-endian integer.
    public func read<T: FixedWidthInteger>(at address: GuestAddress, as: T.Type = T.self) throws -> T {
        var v = T.zero
        try withUnsafeMutableBytes(of: &v) { try read(into: $0, at: address) }
        return T(littleEndian: v)
    }

    /// Writes a little-endian integer.
    public func write<T: FixedWidthInteger>(_ value: T, at address: GuestAddress) throws {
        var v = value.littleEndian
        try withUnsafeBytes(of: &v) { try write($0, at: address) }
    }

    /// Whether [address, address+count) is RAM.
    public func contains(_ address: GuestAddress, count: Int) -> Bool {
        (try? hostPointer(at: address, count: count)) != nil
    }
}

/// One contiguous piece of guest RAM backed by one host mapping.
public struct MemoryRegion: Sendable {
    public let guestBase: GuestAddress
    public let size: UInt64
    /// SAFETY: valid for `size` bytes for the lifetime of the owning GuestRAM.
    nonisolated(unsafe) public let host: UnsafeMutableRawPointer
    public var guestEnd: UInt64 { guestBase.rawValue + size }
}

/// Guest RAM made of anonymous mappings. On x86 the range [3 GiB, 4 GiB) is left for MMIO:
/// a guest larger than 3 GiB gets a second region starting at 4 GiB.
public final class GuestRAM: GuestMemory, @unchecked Sendable {
    public static let mmioHoleStart: UInt64 = 0xC000_0000
    public static let mmioHoleEnd: UInt64 = 0x1_0000_0000
    /// Guest RAM below this is mapped with small pages only.
    public static let lowSmallPages: UInt64 = 2 << 20

    public let regions: [MemoryRegion]
    public let size: ByteCount

    /// Maps `size` bytes of RAM (MAP_NORESERVE: pages cost nothing until the guest touches them).
    public init(size: ByteCount, hugePages: Bool = false) throws {
        guard size.bytes > 0, size.bytes % 4096 == 0 else {
            throw MicroVMError.invalidArgument("guest memory size \(size) must be a positive multiple of 4K")
        }
        var layout: [(UInt64, UInt64)] = []
        if size.bytes <= Self.mmioHoleStart {
            layout = [(0, size.bytes)]
        } else {
            layout = [(0, Self.mmioHoleStart), (Self.mmioHoleEnd, size.bytes - Self.mmioHoleStart)]
        }
        var made: [MemoryRegion] = []
        for (base, len) in layout {
            var flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE
            if hugePages { flags |= MAP_HUGETLB }
            let p = mmap(nil, Int(len), PROT_READ | PROT_WRITE, flags, -1, 0)
            guard let p, p != MAP_FAILED else {
                let e = errno
                for r in made { munmap(r.host, Int(r.size)) }
                throw MicroVMError(.insufficientResources, "cannot map \(ByteCount(len)) of guest memory" + (hugePages ? " with huge pages: reserve them in /proc/sys/vm/nr_hugepages or drop --huge-pages" : ""),
                                   cause: SystemCallError("mmap", errno: e))
            }
            if !hugePages {
                // Transparent huge pages where allowed, but not for the first 2 MiB: the boot
                // tables there (GDT, page tables, MP and ACPI tables, the command line) touch a
                // few small pages, and one huge page would have the kernel zero 2 MiB first.
                let low: UInt64 = base == 0 ? min(Self.lowSmallPages, len) : 0
                if low > 0 { madvise(p, Int(low), 15 /* MADV_NOHUGEPAGE, whatever the host's default */) }
                if len > low { madvise(p + Int(low), Int(len - low), 14 /* MADV_HUGEPAGE */) }
            }
            made.append(MemoryRegion(guestBase: GuestAddress(base), size: len, host: p))
        }
        self.regions = made
        self.size = size
    }

    deinit {
        for r in regions { munmap(r.host, Int(r.size)) }
    }

    public var end: GuestAddress { GuestAddress(regions.last!.guestEnd) }

    public func hostPointer(at address: GuestAddress, count: Int) throws -> UnsafeMutableRawPointer {
        guard count >= 0 else { throw GuestMemoryError(address: address, count: count) }
        let a = address.rawValue
        for r in regions where a >= r.guestBase.rawValue && a < r.guestEnd {
            let off = a - r.guestBase.rawValue
            guard UInt64(count) <= r.size - off else { break }
            return r.host + Int(off)
        }
        throw GuestMemoryError(address: address, count: count)
    }
}
