import Foundation
import MicroVMCore

/// A newc ("070701") cpio archive, the format the kernel unpacks as an initramfs.
/// Written in memory so device nodes (/dev/console) need no root and mtimes stay fixed,
/// which keeps the archive identical for identical inputs.
///
/// ```swift
/// var a = CpioArchive()
/// a.directory("bin")
/// a.file("init", contents: Data("#!/bin/sh\n".utf8), mode: 0o755)
/// let bytes = a.finish()
/// ```
public struct CpioArchive: Sendable {
    public enum Kind: Sendable, Equatable {
        case file(Data)
        case directory
        case symlink(String)
        case characterDevice(major: UInt32, minor: UInt32)
    }

    public struct Entry: Sendable, Equatable {
        public var path: String
        public var kind: Kind
        public var mode: UInt32
    }

    public private(set) var entries: [Entry] = []

    public init() {}

    public mutating func directory(_ path: String, mode: UInt32 = 0o755) { entries.append(Entry(path: path, kind: .directory, mode: mode)) }
    public mutating func file(_ path: String, contents: Data, mode: UInt32 = 0o644) { entries.append(Entry(path: path, kind: .file(contents), mode: mode)) }
    public mutating func symlink(_ path: String, target: String) { entries.append(Entry(path: path, kind: .symlink(target), mode: 0o777)) }
    public mutating func characterDevice(_ path: String, major: UInt32, minor: UInt32, mode: UInt32 = 0o600) {
        entries.append(Entry(path: path, kind: .characterDevice(major: major, minor: minor), mode: mode))
    }

    /// Serialises the entries followed by the TRAILER!!! record.
    public func finish() -> Data {
        var out = Data()
        var ino: UInt32 = 1
        func pad4() { while out.count % 4 != 0 { out.append(0) } }
        func header(_ name: String, mode: UInt32, size: Int, rdev: (UInt32, UInt32) = (0, 0), nlink: UInt32 = 1) {
            let fields: [UInt32] = [ino, mode, 0, 0, nlink, 0, UInt32(size), 0, 0, rdev.0, rdev.1, UInt32(name.utf8.count + 1), 0]
            out.append(contentsOf: Array("070701".utf8))
            for f in fields { out.append(contentsOf: Array(String(format: "%08X", f).utf8)) }
            out.append(contentsOf: Array(name.utf8)); out.append(0)
            pad4()
            ino += 1
        }
        for e in entries {
            switch e.kind {
            case .directory:
                header(e.path, mode: 0o040000 | e.mode, size: 0, nlink: 2)
            case .file(let d):
                header(e.path, mode: 0o100000 | e.mode, size: d.count)
                out.append(d); pad4()
            case .symlink(let t):
                header(e.path, mode: 0o120000 | e.mode, size: t.utf8.count)
                out.append(contentsOf: Array(t.utf8)); pad4()
            case .characterDevice(let major, let minor):
                header(e.path, mode: 0o020000 | e.mode, size: 0, rdev: (major, minor))
            }
        }
        header("TRAILER!!!", mode: 0, size: 0)
        return out
    }

    /// Reads a newc archive back (uncompressed). Throws on anything malformed instead of trapping.
    public static func read(_ data: Data) throws -> [Entry] {
        let b = [UInt8](data)
        var p = 0
        var result: [Entry] = []
        func bad(_ why: String) -> MicroVMError { MicroVMError(.invalidImage, "not a valid newc cpio archive at byte \(p): \(why)") }
        func hex(_ o: Int) throws -> UInt32 {
            guard o + 8 <= b.count, let v = UInt32(String(decoding: b[o..<(o + 8)], as: UTF8.self), radix: 16) else { throw bad("bad header field") }
            return v
        }
        func align(_ x: Int) -> Int { (x + 3) & ~3 }
        while true {
            guard p + 110 <= b.count, String(decoding: b[p..<(p + 6)], as: UTF8.self) == "070701" else { throw bad("missing 070701 magic") }
            let mode = try hex(p + 14)
            let size = Int(try hex(p + 54))
            let rmaj = try hex(p + 78), rmin = try hex(p + 86)
            let nameSize = Int(try hex(p + 94))
            let nameStart = p + 110
            guard nameSize >= 1, nameStart + nameSize <= b.count else { throw bad("name runs past the end") }
            let name = String(decoding: b[nameStart..<(nameStart + nameSize - 1)], as: UTF8.self)
            let dataStart = align(nameStart + nameSize)
            guard dataStart + size <= b.count else { throw bad("'\(name)' data runs past the end") }
            let body = Data(b[dataStart..<(dataStart + size)])
            p = align(dataStart + size)
            if name == "TRAILER!!!" { break }
            let kind: Kind
            switch mode & 0o170000 {
            case 0o040000: kind = .directory
            case 0o120000: kind = .symlink(String(decoding: body, as: UTF8.self))
            case 0o020000: kind = .characterDevice(major: rmaj, minor: rmin)
            default: kind = .file(body)
            }
            result.append(Entry(path: name, kind: kind, mode: mode & 0o7777))
        }
        return result
    }
}
