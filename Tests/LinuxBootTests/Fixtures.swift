import Foundation
import GuestMemory
@testable import LinuxBoot

/// Builders for small kernels the tests synthesize, and little-endian helpers.
enum Fixture {
    /// The newest Debian kernel installed (by its version's numeric runs), whatever Debian has moved to.
    static let debianKernel: String = {
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: "/boot")) ?? []).filter { $0.hasPrefix("vmlinuz-") }
        func runs(_ s: String) -> [Int] { s.split(whereSeparator: { !$0.isNumber }).compactMap { Int($0) } }
        let newest = names.max { runs($0).lexicographicallyPrecedes(runs($1)) }
        return "/boot/" + (newest ?? "vmlinuz-not-installed")
    }()
    static var haveDebianKernel: Bool { FileManager.default.isReadableFile(atPath: debianKernel) }
    static var haveXZ: Bool { FileManager.default.isExecutableFile(atPath: "/usr/bin/xz") }

    /// A minimal well-formed bzImage: protocol 2.15, relocatable, 64-bit, `pmSize` bytes of
    /// protected-mode code filled with a recognisable pattern.
    static func bzImage(setupSects: UInt8 = 4, pmSize: Int = 8192, initSize: UInt32 = 0x20_0000) -> [UInt8] {
        let sects = setupSects == 0 ? 4 : Int(setupSects)
        var f = [UInt8](repeating: 0, count: (sects + 1) * 512 + pmSize)
        f[0x1f1] = setupSects
        f.put(UInt32(pmSize / 16), at: 0x1f4)
        f.put(UInt16(0xffff), at: 0x1fa)
        f.put(UInt16(0xaa55), at: 0x1fe)
        f[0x200] = 0xeb
        f[0x201] = 0x6a  // header ends at 0x26c
        f.replaceSubrange(0x202..<0x206, with: Array("HdrS".utf8))
        f.put(UInt16(0x020f), at: 0x206)
        f[0x211] = 0x01
        f.put(UInt32(0x10_0000), at: 0x214)
        f.put(UInt32(0x7fff_ffff), at: 0x22c)
        f.put(UInt32(0x20_0000), at: 0x230)
        f[0x234] = 1
        f.put(UInt16(0x0003), at: 0x236)
        f.put(UInt32(2047), at: 0x238)
        f.put(UInt32(0x100), at: 0x248)
        f.put(UInt32(0x400), at: 0x24c)
        f.put(UInt64(0x100_0000), at: 0x258)
        f.put(initSize, at: 0x260)
        let pm = (sects + 1) * 512
        for i in 0..<pmSize { f[pm + i] = UInt8(truncatingIfNeeded: i &* 7 &+ 3) }
        return f
    }

    /// A small ELF64 x86-64 executable: one PT_LOAD of `code` at `paddr` with `bss` zero bytes
    /// after it, and (optionally) a PT_NOTE holding the Xen PHYS32_ENTRY note.
    static func elf(paddr: UInt64 = 0x100_0000, code: [UInt8] = Array(repeating: 0x90, count: 300), bss: UInt64 = 4096,
                    pvhEntry: UInt64? = 0x100_0040, noteDescSize: Int = 8, machine: UInt16 = 62) -> [UInt8] {
        var note: [UInt8] = []
        // An unrelated note first, so the walker has to step over one.
        note += le32(4) + le32(4) + le32(1) + Array("GNU\0".utf8) + le32(0xdead_beef)
        if let pvhEntry {
            note += le32(4) + le32(UInt32(noteDescSize)) + le32(18) + Array("Xen\0".utf8)
            note += noteDescSize == 8 ? le64(pvhEntry) : le32(UInt32(truncatingIfNeeded: pvhEntry))
        }
        let phnum = 2
        let phoff = 64
        let noteOff = phoff + phnum * 56
        let codeOff = (noteOff + note.count + 15) & ~15
        var f = [UInt8](repeating: 0, count: codeOff + code.count)
        f.replaceSubrange(0..<4, with: [0x7f, 0x45, 0x4c, 0x46])
        f[4] = 2; f[5] = 1; f[6] = 1
        f.put(UInt16(2), at: 0x10)
        f.put(machine, at: 0x12)
        f.put(UInt32(1), at: 0x14)
        f.put(UInt64(0xffff_ffff_8100_0000), at: 0x18)
        f.put(UInt64(phoff), at: 0x20)
        f.put(UInt16(64), at: 0x34)
        f.put(UInt16(56), at: 0x36)
        f.put(UInt16(phnum), at: 0x38)
        // PT_LOAD
        f.put(UInt32(1), at: phoff)
        f.put(UInt32(5), at: phoff + 4)
        f.put(UInt64(codeOff), at: phoff + 8)
        f.put(paddr | 0xffff_ffff_8000_0000, at: phoff + 0x10)
        f.put(paddr, at: phoff + 0x18)
        f.put(UInt64(code.count), at: phoff + 0x20)
        f.put(UInt64(code.count) + bss, at: phoff + 0x28)
        // PT_NOTE
        f.put(UInt32(4), at: phoff + 56)
        f.put(UInt64(noteOff), at: phoff + 56 + 8)
        f.put(UInt64(note.count), at: phoff + 56 + 0x20)
        f.put(UInt64(note.count), at: phoff + 56 + 0x28)
        f.replaceSubrange(noteOff..<(noteOff + note.count), with: note)
        f.replaceSubrange(codeOff..<(codeOff + code.count), with: code)
        return f
    }

    static func le32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
    static func le64(_ v: UInt64) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }

    /// Decompresses the Debian bzImage's XZ payload into a vmlinux in `dir` (as the kernel's
    /// scripts/extract-vmlinux does).
    static func extractVmlinux(into dir: URL) throws -> String {
        let bz = try BzImage(ImageFile(path: debianKernel))
        let file = try ImageFile(path: debianKernel)
        var payload = [UInt8](repeating: 0, count: Int(bz.payloadLength))
        try payload.withUnsafeMutableBytes { try file.read(into: $0, at: bz.protectedModeOffset + UInt64(bz.payloadOffset)) }
        let xzPath = dir.appendingPathComponent("payload.xz")
        let out = dir.appendingPathComponent("vmlinux")
        try Data(payload).write(to: xzPath)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/xz")
        // The payload has trailing padding xz would reject; --single-stream stops at the end.
        p.arguments = ["-dc", "--single-stream", xzPath.path]
        FileManager.default.createFile(atPath: out.path, contents: nil)
        p.standardOutput = try FileHandle(forWritingTo: out)
        try p.run()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw CocoaError(.fileReadCorruptFile) }
        return out.path
    }

    static func tempDir() throws -> URL {
        let d = FileManager.default.temporaryDirectory.appendingPathComponent("mvm-linuxboot-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: d, withIntermediateDirectories: true)
        return d
    }
}

extension GuestMemory {
    func u8(_ a: UInt64) throws -> UInt8 { try read(at: GuestAddress(a)) }
    func u16(_ a: UInt64) throws -> UInt16 { try read(at: GuestAddress(a)) }
    func u32(_ a: UInt64) throws -> UInt32 { try read(at: GuestAddress(a)) }
    func u64(_ a: UInt64) throws -> UInt64 { try read(at: GuestAddress(a)) }
}
