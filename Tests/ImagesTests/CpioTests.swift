import Foundation
import MicroVMCore
import Testing
@testable import Images

@Suite("newc cpio")
struct CpioTests {
    @Test func roundTripsEveryKind() throws {
        var a = CpioArchive()
        a.directory("bin")
        a.file("bin/data", contents: Data([0, 1, 2, 255, 10]), mode: 0o600)
        a.file("odd", contents: Data("abc".utf8), mode: 0o755)
        a.symlink("bin/sh", target: "/bin/busybox")
        a.characterDevice("dev/console", major: 5, minor: 1)
        let bytes = a.finish()
        #expect(bytes.count % 4 == 0)
        let back = try CpioArchive.read(bytes)
        #expect(back == a.entries)
    }

    @Test func systemCpioAgreesWithTheWriter() throws {
        var a = CpioArchive()
        a.directory("d")
        a.file("d/f", contents: Data("hello".utf8))
        a.symlink("d/l", target: "f")
        let list = try ProcessRunner.check(["cpio", "-it", "--quiet"], input: a.finish(), timeout: 30, package: "cpio")
        #expect(list.stdoutText.split(separator: "\n") == ["d", "d/f", "d/l"])
    }

    @Test func rejectsTruncatedArchives() throws {
        var a = CpioArchive()
        a.file("f", contents: Data(repeating: 7, count: 100))
        let bytes = a.finish()
        #expect(throws: MicroVMError.self) { try CpioArchive.read(bytes.prefix(150)) }
        #expect(throws: MicroVMError.self) { try CpioArchive.read(Data("junk".utf8)) }
    }
}
