import Foundation
import Testing
import MicroVMCore
@testable import Images

/// Image tarballs unpacked and converted once, by content: the same bytes under another name are
/// the same image, other bytes another; the disk is made only when a VM asks for one; a tarball
/// that is not an image leaves nothing behind.
@Suite("container image store", .enabled(if: Fixture.haveBusybox && ProcessRunner.which("mke2fs") != nil, "needs busybox-static and e2fsprogs"))
struct ContainerImageStoreTests {
    @Test func anImageIsUnpackedOnceByContentAndItsDiskMadeOnDemand() throws {
        let dir = try Fixture.tempDir("cimg")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = ContainerImageStore(paths: Paths(state: dir + "/state", cache: dir + "/cache"))
        let config = ImageConfig(entrypoint: ["/bin/sh", "-c"], cmd: ["echo $GREETING"], env: ["PATH=/bin", "GREETING=hello"], workingDir: "/srv")
        try BusyboxImage.make(at: dir + "/bb.tar", config: config, directories: ["/srv"], busybox: try #require(ProcessRunner.which("busybox")))
        let first = try store.prepare(tarball: dir + "/bb.tar", disk: false)
        #expect(first.config == config)
        let fm = FileManager.default
        #expect(fm.isExecutableFile(atPath: first.rootfsTree + "/bin/busybox"))
        #expect(try fm.destinationOfSymbolicLink(atPath: first.rootfsTree + "/bin/sh") == "busybox")
        for d in ["proc", "sys", "dev", "tmp", "run", "srv"] { #expect(fm.fileExists(atPath: first.rootfsTree + "/" + d), "/\(d)") }
        #expect(!fm.fileExists(atPath: first.rootfsDisk), "no VM asked for a disk yet")

        try fm.copyItem(atPath: dir + "/bb.tar", toPath: dir + "/renamed.tar")
        let again = try store.prepare(tarball: dir + "/renamed.tar", disk: true)
        #expect(again.directory == first.directory, "the same bytes are the same image")
        let fsck = try ProcessRunner.run(["e2fsck", "-fn", again.rootfsDisk], timeout: 60)
        #expect(fsck.status == 0, "\(fsck.stdoutText)\(fsck.stderrText)")
        let listing = try ProcessRunner.run(["debugfs", "-R", "stat /bin/busybox", again.rootfsDisk], timeout: 60)
        #expect(listing.stdoutText.contains("Type: regular"), "the disk holds the image's files: \(listing.stdoutText)\(listing.stderrText)")

        try BusyboxImage.make(at: dir + "/oci.tar", format: .oci, busybox: try #require(ProcessRunner.which("busybox")))
        let other = try store.prepare(tarball: dir + "/oci.tar", disk: false)
        #expect(other.directory != first.directory && other.config == BusyboxImage.defaultConfig)
        // Each tarball is hashed once: its digest is remembered by device, inode, size and time.
        let digests = try JSONDecoder().decode([String: String].self, from: Data(contentsOf: URL(fileURLWithPath: dir + "/cache/container-images/.digests.json")))
        #expect(Set(digests.values) == [first.digest, other.digest] && digests.count == 3, "\(digests)")
        #expect(try store.removeAll() == 2)
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir + "/cache/container-images").filter { $0 != ".lock" }.isEmpty)
    }

    @Test func whatIsNotAnImageIsNamedAndLeavesNothing() throws {
        let dir = try Fixture.tempDir("cimg-bad")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = ContainerImageStore(paths: Paths(state: dir + "/state", cache: dir + "/cache"))
        var e = try #require(throws: MicroVMError.self) { try store.prepare(tarball: dir + "/none.tar", disk: false) }
        #expect(e.code == .notFound && e.message.contains("does not exist"))
        try FileManager.default.createDirectory(atPath: dir + "/junk", withIntermediateDirectories: true)
        try "just text".write(toFile: dir + "/junk/readme", atomically: true, encoding: .utf8)
        try ProcessRunner.check(["tar", "-C", dir + "/junk", "-cf", dir + "/junk.tar", "."])
        e = try #require(throws: MicroVMError.self) { try store.prepare(tarball: dir + "/junk.tar", disk: true) }
        #expect(e.code == .invalidImage && e.message.contains("neither manifest.json"), "\(e.message)")
        // No image and no half-built one: only the lock and the remembered digests.
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir + "/cache/container-images").filter { $0 != ".lock" && $0 != ".digests.json" }.isEmpty)
    }
}
