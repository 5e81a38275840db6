import MicroVMCore
import GuestMemory
#if canImport(Glibc)
import Glibc
#endif

/// Random-access, read-only bytes of a kernel or initrd: a file, or an in-memory image in tests.
/// The loaders read headers through it and copy payloads straight into guest memory, so a
/// 40 MiB vmlinux never needs a second copy in the VMM's heap.
public protocol ImageSource: Sendable {
    /// Total length in bytes.
    var size: UInt64 { get }
    /// Fills `buffer` from `offset`; throws `.invalidImage` if the range is past the end.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws
}

extension ImageSource {
    /// Whether [offset, offset+count) lies inside the image (overflow-safe).
    func contains(offset: UInt64, count: UInt64) -> Bool {
        let (end, o) = offset.addingReportingOverflow(count)
        return !o && end <= size
    }

    func bytes(at offset: UInt64, count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { try read(into: $0, at: offset) }
        return out
    }

    /// Copies `count` image bytes from `offset` to guest memory at `address`.
    func copy(offset: UInt64, count: UInt64, to memory: any GuestMemory, at address: GuestAddress) throws {
        guard count > 0 else { return }
        guard count <= UInt64(Int.max) else {
            throw MicroVMError(.invalidImage, "image range of \(count) bytes is too large to load")
        }
        let dst = try memory.hostPointer(at: address, count: Int(count))
        try read(into: UnsafeMutableRawBufferPointer(start: dst, count: Int(count)), at: offset)
    }
}

/// An image held in memory.
public struct ImageBuffer: ImageSource {
    public let bytes: [UInt8]
    public init(_ bytes: [UInt8]) { self.bytes = bytes }
    public var size: UInt64 { UInt64(bytes.count) }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        guard contains(offset: offset, count: UInt64(buffer.count)) else {
            throw MicroVMError(.invalidImage, "truncated: wanted \(buffer.count) bytes at offset \(offset), image has \(bytes.count)")
        }
        guard buffer.count > 0 else { return }
        bytes.withUnsafeBytes { src in
            // SAFETY: the range was checked against the array's length just above.
            buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[Int(offset)..<(Int(offset) + buffer.count)]))
        }
    }
}

/// An image file, read with pread(2). Owns its descriptor.
public final class ImageFile: ImageSource, @unchecked Sendable {
    public let path: String
    public let size: UInt64
    private let fd: Int32

    /// Opens `path` read-only. Throws `.notFound` or `.permissionDenied` with what to do.
    public init(path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let e = errno
            let code: MicroVMError.Code = (e == ENOENT) ? .notFound : (e == EACCES ? .permissionDenied : .invalidArgument)
            throw MicroVMError(code, "cannot open boot image \(path): check the path (build the default image with `mvm image build`)",
                               cause: SystemCallError("open", errno: e))
        }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let e = errno
            close(fd)
            throw MicroVMError(.invalidArgument, "cannot stat boot image \(path)", cause: SystemCallError("fstat", errno: e))
        }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            close(fd)
            throw MicroVMError(.invalidImage, "boot image \(path) is not a regular file")
        }
        self.path = path
        self.fd = fd
        self.size = UInt64(st.st_size)
    }

    deinit { close(fd) }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        guard contains(offset: offset, count: UInt64(buffer.count)) else {
            throw MicroVMError(.invalidImage, "truncated: wanted \(buffer.count) bytes at offset \(offset) of \(path), file has \(size)")
        }
        var done = 0
        while done < buffer.count {
            // SAFETY: buffer.baseAddress is non-nil because count > done >= 0; the slice stays in bounds.
            let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw MicroVMError(.invalidImage, "cannot read boot image \(path)", cause: SystemCallError("pread", errno: errno))
            }
            if n == 0 {
                throw MicroVMError(.invalidImage, "\(path) shrank while loading: wanted \(buffer.count) bytes at offset \(offset)")
            }
            done += n
        }
    }
}

/// Little-endian field access on header bytes; callers check lengths first.
extension Array where Element == UInt8 {
    func le<T: FixedWidthInteger>(_ offset: Int, as: T.Type = T.self) -> T {
        precondition(offset >= 0 && offset + MemoryLayout<T>.size <= count)
        return withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
    }

    mutating func put<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        precondition(offset >= 0 && offset + MemoryLayout<T>.size <= count)
        withUnsafeMutableBytes { $0.storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self) }
    }
}

func hex<T: BinaryInteger>(_ v: T) -> String { "0x" + String(v, radix: 16) }
