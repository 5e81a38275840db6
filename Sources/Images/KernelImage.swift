import Foundation
import MicroVMCore

/// A Debian kernel on this host: the bzImage in /boot and its modules tree, for one exact version.
public struct DebianKernel: Sendable, Equatable {
    public var version: String
    public var bzImage: String
    public var modulesDirectory: String

    /// Picks the newest version that has both /boot/vmlinuz-VERSION and /lib/modules/VERSION.
    /// The running kernel (`uname -r`) is irrelevant: the host may boot a different one.
    public static func newest(boot: String = "/boot", modules: String = "/lib/modules") throws -> DebianKernel {
        let fm = FileManager.default
        let images = (try? fm.contentsOfDirectory(atPath: boot)) ?? []
        let versions = images.compactMap { name -> String? in
            guard name.hasPrefix("vmlinuz-") else { return nil }
            let v = String(name.dropFirst("vmlinuz-".count))
            var isDir: ObjCBool = false
            guard fm.fileExists(atPath: "\(modules)/\(v)/modules.dep", isDirectory: &isDir), !isDir.boolValue else { return nil }
            return v
        }
        guard let best = versions.max(by: { compareVersions($0, $1) < 0 }) else {
            throw MicroVMError.notFound(
                "no Debian kernel found (need \(boot)/vmlinuz-VERSION and \(modules)/VERSION/modules.dep): run 'apt-get install linux-image-amd64'")
        }
        return DebianKernel(version: best, bzImage: "\(boot)/vmlinuz-\(best)", modulesDirectory: "\(modules)/\(best)")
    }

    /// Orders "6.1.0-56-amd64" style versions by their numeric runs, so 6.1.0-100 sorts after 6.1.0-56.
    static func compareVersions(_ a: String, _ b: String) -> Int {
        func parts(_ s: String) -> [Int] {
            s.split(whereSeparator: { !$0.isNumber }).compactMap { Int($0) }
        }
        let pa = parts(a), pb = parts(b)
        for (x, y) in zip(pa, pb) where x != y { return x < y ? -1 : 1 }
        if pa.count != pb.count { return pa.count < pb.count ? -1 : 1 }
        return a == b ? 0 : (a < b ? -1 : 1)
    }
}

/// The setup header of an x86 bzImage (Documentation/arch/x86/boot.rst), enough to find and
/// unpack the compressed kernel inside it.
public struct BzImageHeader: Sendable, Equatable {
    public var setupSectors: Int
    public var protocolVersion: UInt16
    public var payloadOffset: Int
    public var payloadLength: Int

    /// Where the protected-mode code (and so the payload offset's origin) starts in the file.
    public var protectedModeStart: Int { (setupSectors + 1) * 512 }
    public var payloadRange: Range<Int> { (protectedModeStart + payloadOffset)..<(protectedModeStart + payloadOffset + payloadLength) }

    public init(data: Data, path: String = "kernel") throws {
        let bytes = [UInt8](data.prefix(0x250))
        guard bytes.count >= 0x250 else {
            throw MicroVMError(.invalidImage, "'\(path)' is not a bzImage: only \(data.count) bytes, shorter than a setup header; reinstall the kernel package (apt-get install --reinstall linux-image-amd64)")
        }
        func u16(_ o: Int) -> UInt16 { UInt16(bytes[o]) | UInt16(bytes[o + 1]) << 8 }
        func u32(_ o: Int) -> UInt32 { UInt32(u16(o)) | UInt32(u16(o + 2)) << 16 }
        guard u32(0x202) == 0x5372_6448 else {
            throw MicroVMError(.invalidImage, "'\(path)' is not a bzImage: no 'HdrS' magic at offset 0x202; pass a Linux bzImage (e.g. /boot/vmlinuz-*)")
        }
        protocolVersion = u16(0x206)
        guard protocolVersion >= 0x208 else {
            throw MicroVMError(.invalidImage, "'\(path)' uses boot protocol \(String(protocolVersion, radix: 16)); 2.08 or newer is needed to find the payload")
        }
        setupSectors = bytes[0x1f1] == 0 ? 4 : Int(bytes[0x1f1])
        payloadOffset = Int(u32(0x248))
        payloadLength = Int(u32(0x24c))
        guard payloadLength > 0, payloadRange.upperBound <= data.count else {
            throw MicroVMError(.invalidImage, "'\(path)' is truncated: its payload ends at byte \(payloadRange.upperBound) but the file has \(data.count); reinstall the kernel package")
        }
    }
}

/// The compressors a bzImage payload may use, recognised by their magic.
public enum PayloadCompression: String, Sendable, CaseIterable {
    case gzip, bzip2, lzma, xz, lzo, lz4, zstd, none

    public static func detect(_ d: Data) -> PayloadCompression {
        let b = [UInt8](d.prefix(6))
        func starts(_ m: [UInt8]) -> Bool { b.count >= m.count && Array(b.prefix(m.count)) == m }
        if starts([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]) { return .xz }
        if starts([0x1f, 0x8b]) { return .gzip }
        if starts([0x28, 0xb5, 0x2f, 0xfd]) { return .zstd }
        if starts([0x42, 0x5a, 0x68]) { return .bzip2 }
        if starts([0x5d, 0x00, 0x00]) { return .lzma }
        if starts([0x89, 0x4c, 0x5a, 0x4f]) { return .lzo }
        if starts([0x02, 0x21, 0x4c, 0x18]) { return .lz4 }
        if starts([0x7f, 0x45, 0x4c, 0x46]) { return .none }
        return .none
    }

    /// The decompressing command reading stdin. The kbuild payload ends with a 4-byte size
    /// trailer, which --single-stream (xz) and quiet modes let the tools ignore.
    var command: (argv: [String], package: String)? {
        switch self {
        case .xz: (["xz", "-dc", "--single-stream"], "xz-utils")
        case .lzma: (["xz", "-dc", "--format=lzma", "--single-stream"], "xz-utils")
        case .gzip: (["gzip", "-dcq"], "gzip")
        case .bzip2: (["bzip2", "-dcq"], "bzip2")
        case .zstd: (["zstd", "-dcq"], "zstd")
        case .lz4: (["lz4", "-dcq"], "lz4")
        case .lzo: (["lzop", "-dcq"], "lzop")
        case .none: nil
        }
    }
}

/// What the extracted ELF kernel offers a loader.
public struct VmlinuxInfo: Sendable, Equatable {
    public var compression: PayloadCompression
    public var size: Int
    /// XEN_ELFNOTE_PHYS32_ENTRY (type 18 in a "Xen" note): the kernel can boot through PVH.
    public var pvhEntry: UInt32?
    public var hasPVHNote: Bool { pvhEntry != nil }
}

/// Turns a bzImage into the ELF `vmlinux` inside it.
///
/// ```swift
/// let info = try VmlinuxExtractor.extract(bzImage: "/boot/vmlinuz-6.1.0-56-amd64", to: "/tmp/vmlinux")
/// print(info.hasPVHNote)
/// ```
public enum VmlinuxExtractor {
    public static func extract(bzImage path: String, to output: String) throws -> VmlinuxInfo {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw MicroVMError.notFound("cannot read kernel '\(path)': check it exists and is readable")
        }
        let header = try BzImageHeader(data: data, path: path)
        let payload = data.subdata(in: header.payloadRange)
        let kind = PayloadCompression.detect(payload)
        let elf: Data
        if let cmd = kind.command {
            let out = try ProcessRunner.run(cmd.argv, input: payload, timeout: 300, package: cmd.package)
            // Some tools warn (status 2) about the size trailer yet produce the whole output.
            guard out.status == 0 || (out.status == 2 && !out.stdout.isEmpty) else {
                throw MicroVMError(.invalidImage, "'\(path)': the \(kind.rawValue) payload does not decompress (\(out.stderrText.prefix(300))); the kernel file is corrupt: reinstall it")
            }
            elf = out.stdout
        } else {
            elf = payload
        }
        let pvh = try ElfNotes.pvhEntry(elf: elf, path: path)
        try elf.write(to: URL(fileURLWithPath: output))
        return VmlinuxInfo(compression: kind, size: elf.count, pvhEntry: pvh)
    }
}

/// Reads ELF64 notes with every offset checked, since the file may be corrupt.
enum ElfNotes {
    static let xenNoteName = "Xen"
    static let phys32EntryType: UInt32 = 18

    /// Returns the PVH entry address, nil when the ELF has no such note; throws when not ELF64.
    static func pvhEntry(elf: Data, path: String) throws -> UInt32? {
        let b = [UInt8](elf)
        guard b.count >= 64, b[0] == 0x7f, b[1] == 0x45, b[2] == 0x4c, b[3] == 0x46, b[4] == 2, b[5] == 1 else {
            throw MicroVMError(.invalidImage, "'\(path)': the decompressed payload is not a little-endian ELF64 file; the kernel is corrupt or not x86_64")
        }
        func u16(_ o: Int) -> Int? { o >= 0 && o + 2 <= b.count ? Int(b[o]) | Int(b[o + 1]) << 8 : nil }
        func u32(_ o: Int) -> UInt32? {
            guard o >= 0, o + 4 <= b.count else { return nil }
            return UInt32(b[o]) | UInt32(b[o + 1]) << 8 | UInt32(b[o + 2]) << 16 | UInt32(b[o + 3]) << 24
        }
        func u64(_ o: Int) -> Int? {
            guard let lo = u32(o), let hi = u32(o + 4), hi < 0x8000_0000 else { return nil }
            return Int(hi) << 32 | Int(lo)
        }
        guard let phoff = u64(0x20), let phentsize = u16(0x36), let phnum = u16(0x38), phentsize >= 56 else { return nil }
        for i in 0..<phnum {
            let ph = phoff + i * phentsize
            guard let type = u32(ph), type == 4, let off = u64(ph + 8), let size = u64(ph + 32) else { continue }
            var p = off
            let end = min(off + size, b.count)
            while p + 12 <= end {
                guard let namesz = u32(p).map(Int.init), let descsz = u32(p + 4).map(Int.init), let ntype = u32(p + 8) else { break }
                let nameStart = p + 12
                let descStart = nameStart + ((namesz + 3) & ~3)
                let next = descStart + ((descsz + 3) & ~3)
                guard namesz <= 64, descsz <= 4096, next <= end else { break }
                let name = String(decoding: b[nameStart..<(nameStart + namesz)].prefix { $0 != 0 }, as: UTF8.self)
                if name == xenNoteName, ntype == phys32EntryType, descsz >= 4, let entry = u32(descStart) {
                    return entry
                }
                p = next
            }
        }
        return nil
    }
}
