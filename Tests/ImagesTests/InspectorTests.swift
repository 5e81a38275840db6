import Foundation
import MicroVMCore
import Testing
@testable import Images

@Suite("libguestfs inspection")
struct InspectorTests {
    @Test func missingAndEmptyDisksAreClearErrors() throws {
        let dir = try Fixture.tempDir("inspect")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let e1 = #expect(throws: MicroVMError.self) { try ImageInspector.inspect(path: dir + "/nope.img") }
        #expect(e1?.code == .notFound)
        _ = FileManager.default.createFile(atPath: dir + "/empty.img", contents: Data())
        let e2 = #expect(throws: MicroVMError.self) { try ImageInspector.inspect(path: dir + "/empty.img") }
        #expect(e2?.code == .invalidImage)
        #expect(e2?.message.contains("empty or truncated") == true)
    }

    /// Launches the libguestfs appliance (~30 s under TCG), once for a good disk and once for garbage.
    @Test(.enabled(if: Fixture.canBuild && Fixture.haveGuestfs, "needs libguestfs-tools, a Debian kernel (linux-image-amd64), busybox-static and e2fsprogs"),
          .timeLimit(.minutes(8)))
    func rootfsDiskShowsAnExt4Filesystem() throws {
        let img = try Fixture.image()
        let r = try ImageInspector.inspect(path: img.rootfsDisk)
        let fs = try #require(r.filesystems.first)
        #expect(fs.type == "ext4")
        #expect(fs.label == "mvm-rootfs")
        #expect(fs.sizeBytes == 512 << 20)
        #expect(r.partitions.isEmpty)
    }
}
