import Foundation
import MicroVMCore
import Testing
@testable import Images

/// Boots the default image under QEMU TCG (no KVM needed): proves the kernel, the initramfs's
/// modules, the init and the rootfs disk work together. About 30 s per boot on a 2-core host.
@Suite("image boots under QEMU TCG", .serialized,
       .enabled(if: Fixture.canBuild && Fixture.haveQEMU, "needs qemu-system-x86, a Debian kernel (linux-image-amd64), busybox-static and e2fsprogs"),
       .timeLimit(.minutes(10)))
struct BootTests {
    @Test func runsACommandChrootedIntoTheRootfsDisk() throws {
        let img = try Fixture.image()
        let (p, console) = try Fixture.bootQEMU(img, command: ["sh", "-c", "echo hello; test -x /usr/bin/sysbench || echo no-sysbench >&2; exit 3"],
                                                disk: img.rootfsDisk)
        #expect(p.bootComplete, "no boot-complete line; console:\n\(console.suffix(3000))")
        let r = try #require(p.report, "no framed result; console:\n\(console.suffix(3000))")
        #expect(r.outputText == "hello\n")
        #expect(r.status == 3)
    }

    @Test func runsInTheInitramfsWithoutADisk() throws {
        let img = try Fixture.image()
        let (p, console) = try Fixture.bootQEMU(img, command: ["sh", "-c", "test -e /usr/bin/sysbench && echo disk || echo initramfs; cat /proc/modules | wc -l"], disk: nil)
        let r = try #require(p.report, "no framed result; console:\n\(console.suffix(3000))")
        #expect(r.status == 0)
        let lines = r.outputText.split(separator: "\n")
        #expect(lines.first == "initramfs")
        // Every module the initramfs lists was loaded (or was already built in).
        #expect(Int(lines.last?.trimmingCharacters(in: .whitespaces) ?? "") == img.modules.count)
    }

    @Test func anUnmountableDiskStillEndsInAFramedFailure() throws {
        let img = try Fixture.image()
        let dir = try Fixture.tempDir("baddisk")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Data(repeating: 0xAB, count: 4 << 20).write(to: URL(fileURLWithPath: dir + "/bad.img"))
        let (p, console) = try Fixture.bootQEMU(img, command: ["true"], disk: dir + "/bad.img")
        let r = try #require(p.report, "no framed result; console:\n\(console.suffix(3000))")
        #expect(r.status != 0)
        #expect(r.outputText.contains("not mountable"))
    }

    /// QEMU boots an ELF kernel through its PVH note, so this proves the extracted vmlinux is whole.
    @Test func extractedVmlinuxBootsThroughPVH() throws {
        let img = try Fixture.image()
        try #require(img.hasPVHNote, "the extracted vmlinux has no PVH note")
        let (p, console) = try Fixture.bootQEMU(img, command: ["uname", "-r"], disk: nil, kernel: img.vmlinux)
        let r = try #require(p.report, "no framed result; console:\n\(console.suffix(3000))")
        #expect(r.status == 0)
        #expect(r.outputText == img.kernelVersion + "\n")
    }
}
