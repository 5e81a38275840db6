import Foundation
import MicroVMCore
import Testing
@testable import Images

@Suite("kernel discovery and bzImage parsing")
struct KernelTests {
    @Test func picksNewestVersionWithBothImageAndModules() throws {
        let dir = try Fixture.tempDir("kern")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let fm = FileManager.default
        try fm.createDirectory(atPath: "\(dir)/boot", withIntermediateDirectories: true)
        for v in ["6.1.0-9-amd64", "6.1.0-56-amd64", "6.1.0-100-amd64", "6.12.0-1-amd64"] {
            _ = fm.createFile(atPath: "\(dir)/boot/vmlinuz-\(v)", contents: Data())
        }
        // 6.12 has an image but no modules, so it cannot be used.
        for v in ["6.1.0-9-amd64", "6.1.0-56-amd64", "6.1.0-100-amd64"] {
            try fm.createDirectory(atPath: "\(dir)/modules/\(v)", withIntermediateDirectories: true)
            _ = fm.createFile(atPath: "\(dir)/modules/\(v)/modules.dep", contents: Data())
        }
        let k = try DebianKernel.newest(boot: dir + "/boot", modules: dir + "/modules")
        #expect(k.version == "6.1.0-100-amd64")
        #expect(k.bzImage == "\(dir)/boot/vmlinuz-6.1.0-100-amd64")
    }

    @Test func missingKernelSaysWhatToInstall() throws {
        let dir = try Fixture.tempDir("nokern")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let e = #expect(throws: MicroVMError.self) { try DebianKernel.newest(boot: dir, modules: dir) }
        #expect(e?.code == .notFound)
        #expect(e?.message.contains("apt-get install linux-image-amd64") == true)
    }

    func header(_ mutate: (inout [UInt8]) -> Void) -> Data {
        var b = [UInt8](repeating: 0, count: 4096)
        b[0x1f1] = 3
        b[0x202] = 0x48; b[0x203] = 0x64; b[0x204] = 0x72; b[0x205] = 0x53   // HdrS
        b[0x206] = 0x0f; b[0x207] = 0x02                                       // protocol 2.15
        b[0x248] = 0x10                                                        // payload offset 16
        b[0x24c] = 0x20                                                        // payload length 32
        mutate(&b)
        return Data(b)
    }

    @Test func parsesTheSetupHeaderFields() throws {
        let h = try BzImageHeader(data: header { _ in })
        #expect(h.setupSectors == 3)
        #expect(h.protectedModeStart == 2048)
        #expect(h.payloadRange == 2064..<2096)
        #expect(h.protocolVersion == 0x20f)
    }

    @Test func rejectsBadMagicTruncationAndTinyFiles() throws {
        let bad = #expect(throws: MicroVMError.self) { try BzImageHeader(data: header { $0[0x202] = 0x58 }, path: "k") }
        #expect(bad?.code == .invalidImage)
        #expect(bad?.message.contains("HdrS") == true)
        let trunc = #expect(throws: MicroVMError.self) { try BzImageHeader(data: header { $0[0x24d] = 0x10 }, path: "k") }
        #expect(trunc?.message.contains("truncated") == true)
        let tiny = #expect(throws: MicroVMError.self) { try BzImageHeader(data: Data(repeating: 0, count: 100), path: "k") }
        #expect(tiny?.message.contains("not a bzImage") == true)
    }

    @Test func corruptKernelFilesGiveClearErrors() throws {
        let dir = try Fixture.tempDir("corrupt")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Data("this is not a kernel".utf8).write(to: URL(fileURLWithPath: dir + "/k1"))
        let e1 = #expect(throws: MicroVMError.self) { try VmlinuxExtractor.extract(bzImage: dir + "/k1", to: dir + "/out") }
        #expect(e1?.code == .invalidImage)
        // A header that points at an XZ payload which is garbage.
        var d = header { _ in }
        let start = 2064
        d.replaceSubrange(start..<(start + 6), with: [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00])
        try d.write(to: URL(fileURLWithPath: dir + "/k2"))
        let e2 = #expect(throws: MicroVMError.self) { try VmlinuxExtractor.extract(bzImage: dir + "/k2", to: dir + "/out") }
        #expect(e2?.code == .invalidImage)
        #expect(!FileManager.default.fileExists(atPath: dir + "/out"))
    }

    @Test(.enabled(if: Fixture.haveKernel, "no Debian kernel (apt-get install linux-image-amd64)"))
    func realKernelTruncatedIsRejected() throws {
        let k = try DebianKernel.newest()
        let data = try #require(FileManager.default.contents(atPath: k.bzImage))
        let e = #expect(throws: MicroVMError.self) { try BzImageHeader(data: data.prefix(data.count / 2), path: k.bzImage) }
        #expect(e?.message.contains("truncated") == true)
        let h = try BzImageHeader(data: data, path: k.bzImage)
        #expect(PayloadCompression.detect(data.subdata(in: h.payloadRange)) != .none)
    }

    @Test func findsThePVHNoteInAHandMadeELF() throws {
        // ELF64 header + one PT_NOTE program header + a "Xen" note of type 18.
        var b = [UInt8](repeating: 0, count: 256)
        b[0...5] = [0x7f, 0x45, 0x4c, 0x46, 2, 1]
        b[0x20] = 64            // e_phoff
        b[0x36] = 56            // e_phentsize
        b[0x38] = 1             // e_phnum
        b[64] = 4               // p_type PT_NOTE
        b[64 + 8] = 128         // p_offset
        b[64 + 32] = 20         // p_filesz
        let note: [UInt8] = [4, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0, 0x58, 0x65, 0x6e, 0, 0x78, 0x56, 0x34, 0x12]
        b.replaceSubrange(128..<148, with: note)
        #expect(try ElfNotes.pvhEntry(elf: Data(b), path: "t") == 0x1234_5678)
        b[128 + 8] = 17
        #expect(try ElfNotes.pvhEntry(elf: Data(b), path: "t") == nil)
        // Offsets pointing outside the file are ignored, never trapped on.
        b[64 + 8] = 0xff; b[64 + 9] = 0xff; b[64 + 32] = 0xff; b[64 + 33] = 0xff
        #expect(try ElfNotes.pvhEntry(elf: Data(b), path: "t") == nil)
        #expect(throws: MicroVMError.self) { try ElfNotes.pvhEntry(elf: Data(repeating: 1, count: 100), path: "t") }
    }
}
