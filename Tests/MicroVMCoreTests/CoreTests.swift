import Testing
import Foundation
@testable import MicroVMCore
import ConfigFile

@Suite struct ByteCountTests {
    @Test func parsesUnits() throws {
        #expect(try ByteCount(parsing: "128M") == .mebibytes(128))
        #expect(try ByteCount(parsing: "2GiB") == .gibibytes(2))
        #expect(try ByteCount(parsing: "4096") == ByteCount(4096))
        #expect(ByteCount.mebibytes(512).description == "512M")
    }
    @Test func rejectsGarbage() {
        #expect(throws: MicroVMError.self) { try ByteCount(parsing: "lots") }
        #expect(throws: MicroVMError.self) { try ByteCount(parsing: "12Q") }
        #expect(throws: MicroVMError.self) { try ByteCount(parsing: "99999999999999T") }
    }
}

@Suite struct GuestProtocolTests {
    @Test func frameRoundTrips() {
        let payload = Data((0..<300).map { UInt8($0 % 256) })
        let text = "noise\r\n\(GuestProtocol.bootCompleteMarker) uptime=1.50@@\r\n[ 1.2] kernel says hi\n" + GuestProtocol.frame(output: payload, status: 7)
        let p = ConsoleParser.parse(text)
        #expect(p.bootComplete)
        #expect(p.bootUptime == 1.5)
        #expect(p.report?.status == 7)
        #expect(p.report?.output == payload)
    }
    @Test func incrementalFeedSplitsAnywhere() {
        let text = GuestProtocol.frame(output: Data("hello\nworld\n".utf8), status: 0)
        var p = ConsoleParser()
        for b in text.utf8 { p.feed([b]) }
        #expect(p.report?.outputText == "hello\nworld\n")
    }
    @Test func commandEncodingSurvivesSpaces() {
        let argv = ["sh", "-c", "echo 'a b' \"c\""]
        #expect(GuestProtocol.decodeCommand(GuestProtocol.encodeCommand(argv)) == argv)
    }
    /// A hostile guest: megabytes without a newline, then a frame. Memory stays bounded and the
    /// frame that follows is still read.
    @Test func anEndlessLineIsCutAndTheFrameAfterItStillCounts() {
        var p = ConsoleParser()
        let junk = [UInt8](repeating: 0x41, count: 1 << 20)
        for _ in 0..<8 { p.feed(junk) }
        p.feed(Array(("\n" + GuestProtocol.frame(output: Data("ok\n".utf8), status: 3)).utf8))
        #expect(p.report?.status == 3 && p.report?.outputText == "ok\n")
    }

    @Test func noEndMeansNoReport() {
        let p = ConsoleParser.parse("@@mvm:d aGVsbG8=\n")
        #expect(p.report == nil)
    }
}

@Suite struct ConfigTests {
    @Test func repositoryConfigParses() throws {
        let cfg = try MicroVMConfig.load(path: Paths.sourceDirectory() + "/config/microvm.yaml")
        #expect(try cfg.profile(named: "tiny").memory == .mebibytes(128))
    }
    @Test func unknownProfileNamesTheChoices() throws {
        let cfg = try MicroVMConfig.parse(MicroVMConfig.builtinDefault)
        #expect {
            try cfg.profile(named: "huge")
        } throws: { e in
            "\(e)".contains("unknown profile 'huge'") && "\(e)".contains("tiny")
        }
    }
    @Test func typoInPlacementIsAnError() {
        let bad = MicroVMConfig.builtinDefault.replacingOccurrences(of: "placement: pinned", with: "placement: pined")
        #expect(throws: MicroVMError.self) { try MicroVMConfig.parse(bad) }
    }
    @Test func cpuListsRoundTrip() throws {
        #expect(try CPUList.parse("0-3,6") == [0, 1, 2, 3, 6])
        #expect(CPUList.format([6, 0, 1, 2, 3]) == "0-3,6")
        #expect(throws: MicroVMError.self) { try CPUList.parse("3-1") }
    }
}

/// FNV-1a (64-bit) as 16 hex digits: the published values, so a Docker tag or VM name made from
/// it does not change between releases.
@Suite struct ShortDigestTests {
    @Test func matchesFNV1a() {
        #expect(shortDigest("") == "cbf29ce484222325")
        #expect(shortDigest("a") == "af63dc4c8601ec8c")
        #expect(shortDigest("foobar") == "85944171f73967e8")
    }
}

/// A guest's balloon statistics are the guest's to make up: sizes from them saturate, and the
/// use computed from them never traps.
@Suite struct GuestFiguresTests {
    @Test func hostileStatisticsSaturate() {
        #expect(ByteCount.kibibytes(.max) == ByteCount(.max) && ByteCount(.max) + ByteCount(1) == ByteCount(.max))
        let use = GuestMemoryUse(boot: .mebibytes(512), balloonPages: .max, guestTotal: .max, guestAvailable: .max)
        #expect(use.current == ByteCount(0) && use.used == ByteCount(0))
        let fair = GuestMemoryUse(boot: .mebibytes(512), balloonPages: 0, guestTotal: 512 << 20, guestAvailable: 412 << 20)
        #expect(fair.used == .mebibytes(100))
    }
}
