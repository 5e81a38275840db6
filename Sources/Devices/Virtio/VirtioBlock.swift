import CLinux
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import MicroVMCore

/// virtio-blk (virtio 1.x §5.2) over a raw file: IN, OUT, FLUSH, GET_ID. Sector ranges are
/// checked against the capacity; a read-only disk refuses OUT with IOERR and offers F_RO.
public final class VirtioBlock: VirtioDevice, @unchecked Sendable {
    public static let typeIn: UInt32 = 0, typeOut: UInt32 = 1, typeFlush: UInt32 = 4, typeGetID: UInt32 = 8
    public static let statusOK: UInt8 = 0, statusIOErr: UInt8 = 1, statusUnsupported: UInt8 = 2
    public static let featureSegMax: UInt64 = 1 << 2, featureRO: UInt64 = 1 << 5, featureFlush: UInt64 = 1 << 9
    public static let sectorSize: UInt64 = 512
    /// Largest data transfer of one request; bigger ones get IOERR rather than a huge allocation.
    public static let maxRequestBytes = 4 << 20

    public let path: String
    public let readOnly: Bool
    public let direct: Bool
    public let capacitySectors: UInt64
    public let queueSize: UInt16
    private let fd: Int32

    public var deviceType: UInt32 { 2 }
    public var queueMaxSizes: [UInt16] { [queueSize] }
    public var deviceFeatures: UInt64 { Self.featureSegMax | Self.featureFlush | (readOnly ? Self.featureRO : 0) }

    public init(path: String, readOnly: Bool = false, direct: Bool = false, queueSize: UInt16 = 256) throws {
        self.path = path; self.readOnly = readOnly; self.direct = direct; self.queueSize = queueSize
        var flags = (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC
        if direct { flags |= 0o40000 }  // O_DIRECT on x86-64; the Swift Glibc module hides it
        let fd = open(path, flags)
        guard fd >= 0 else {
            let why = String(cString: strerror(errno))
            throw MicroVMError.invalidArgument("cannot open disk image '\(path)'\(readOnly ? " read-only" : "")\(direct ? " with O_DIRECT" : ""): \(why); check the path and its permissions\(direct ? ", or drop the direct option on filesystems without O_DIRECT (tmpfs)" : "")")
        }
        var st = stat()
        guard fstat(fd, &st) == 0 else { close(fd); throw MicroVMError.invalidArgument("cannot stat disk image '\(path)'") }
        self.fd = fd
        capacitySectors = UInt64(st.st_size) / Self.sectorSize
    }

    deinit { close(fd) }

    public func config() -> [UInt8] {
        var c = [UInt8](repeating: 0, count: 24)
        withUnsafeBytes(of: capacitySectors.littleEndian) { c.replaceSubrange(0..<8, with: $0) }
        withUnsafeBytes(of: UInt32(Int(queueSize) - 2).littleEndian) { c.replaceSubrange(12..<16, with: $0) }  // seg_max
        return c
    }

    /// The id GET_ID returns: the file name, cut to the 20 bytes the spec allows.
    public var serial: [UInt8] { Array((path.split(separator: "/").last.map(String.init) ?? "mvm-disk").utf8.prefix(20)) }

    public func handle(queue: Int, chain: DescriptorChain, memory: any GuestMemory) throws -> UInt32 {
        let header = try chain.readAll(memory: memory, limit: 16)
        // The status byte is the last writable byte; without one the request cannot be answered.
        guard let last = chain.writable.last else { throw VirtqueueError.badRing("block request without a writable status byte") }
        let statusAddr = GuestAddress(last.address.rawValue + UInt64(last.length) - 1)
        let dataIn = chain.writableLength - 1
        guard header.count == 16 else {
            try memory.write(Self.statusIOErr, at: statusAddr); return 1
        }
        let type = header.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: 0, as: UInt32.self)) }
        let sector = header.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self)) }
        var written: UInt32 = 1
        let status: UInt8
        switch type {
        case Self.typeIn:
            status = transfer(sector: sector, length: dataIn) { offset, count in
                let buf = try alignedBuffer(count)
                defer { buf.deallocate() }
                let n = pread(fd, buf.baseAddress, count, off_t(offset))
                guard n == count else { return false }
                try chain.write(Array(buf), memory: memory)
                return true
            }
            if status == Self.statusOK { written += UInt32(dataIn) }
        case Self.typeOut:
            let dataOut = chain.readableLength - 16
            if readOnly { status = Self.statusIOErr; break }
            status = transfer(sector: sector, length: dataOut) { offset, count in
                let bytes = try chain.readAll(memory: memory, limit: 16 + count).dropFirst(16)
                guard bytes.count == count else { return false }
                let buf = try alignedBuffer(count)
                defer { buf.deallocate() }
                _ = buf.initialize(from: bytes)
                return pwrite(fd, buf.baseAddress, count, off_t(offset)) == count
            }
        case Self.typeFlush:
            status = readOnly || fsync(fd) == 0 ? Self.statusOK : Self.statusIOErr
        case Self.typeGetID:
            var id = serial
            id += [UInt8](repeating: 0, count: max(0, 20 - id.count))
            written += UInt32(try chain.write(Array(id.prefix(min(20, dataIn))), memory: memory))
            status = Self.statusOK
        default:
            status = Self.statusUnsupported
        }
        try memory.write(status, at: statusAddr)
        return written
    }

    /// Checks the sector range, then runs `io` (offset, byte count); maps failures to IOERR.
    private func transfer(sector: UInt64, length: Int, _ io: (UInt64, Int) throws -> Bool) -> UInt8 {
        guard length >= 0, length <= Self.maxRequestBytes, UInt64(length) % Self.sectorSize == 0 else { return Self.statusIOErr }
        let sectors = UInt64(length) / Self.sectorSize
        let (end, overflow) = sector.addingReportingOverflow(sectors)
        guard !overflow, end <= capacitySectors else { return Self.statusIOErr }
        if length == 0 { return Self.statusOK }
        return ((try? io(sector * Self.sectorSize, length)) ?? false) ? Self.statusOK : Self.statusIOErr
    }

    /// O_DIRECT needs buffers aligned to the logical block; 4 KiB covers every disk.
    private func alignedBuffer(_ count: Int) throws -> UnsafeMutableBufferPointer<UInt8> {
        let raw = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1), alignment: 4096)
        return UnsafeMutableBufferPointer(start: raw.bindMemory(to: UInt8.self, capacity: count), count: count)
    }
}

/// virtio-rng (virtio 1.x §5.4): fills each writable buffer from getrandom(2).
public final class VirtioRng: VirtioDevice, Sendable {
    /// Bytes served per request at most, so one huge buffer cannot monopolise the I/O thread.
    public static let maxRequestBytes = 64 << 10
    public init() {}
    public var deviceType: UInt32 { 4 }
    public var deviceFeatures: UInt64 { 0 }
    public var queueMaxSizes: [UInt16] { [64] }
    public func config() -> [UInt8] { [] }

    public func handle(queue: Int, chain: DescriptorChain, memory: any GuestMemory) throws -> UInt32 {
        let n = min(chain.writableLength, Self.maxRequestBytes)
        var bytes = [UInt8](repeating: 0, count: n)
        var filled = 0
        while filled < n {
            let r = bytes.withUnsafeMutableBytes { clinux_getrandom($0.baseAddress! + filled, n - filled, 0) }
            if r < 0 { if errno == EINTR { continue }; break }
            filled += r
        }
        return UInt32(try chain.write(Array(bytes.prefix(filled)), memory: memory))
    }
}
