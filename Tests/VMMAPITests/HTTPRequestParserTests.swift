import MicroVMCore
import Testing
@testable import VMMAPI

/// What a parser made of a byte stream: the requests it returned, then the error it stopped at (if any).
struct ParseOutcome: Equatable {
    var requests: [HTTPRequest] = []
    var error: HTTPParseError?
    var leftover = 0
}

/// Feeds `bytes` in the given chunk sizes (cycled), draining complete requests after each chunk.
func parse(_ bytes: [UInt8], chunks: [Int] = [], limits: HTTPRequestParser.Limits = .init()) -> ParseOutcome {
    var parser = HTTPRequestParser(limits: limits)
    var outcome = ParseOutcome()
    var offset = 0
    var k = 0
    while offset < bytes.count {
        let size = chunks.isEmpty ? bytes.count : max(1, chunks[k % chunks.count])
        k += 1
        let end = min(bytes.count, offset + size)
        parser.append(bytes[offset..<end])
        offset = end
        do {
            while let r = try parser.next() { outcome.requests.append(r) }
        } catch {
            outcome.error = error
            return outcome
        }
    }
    outcome.leftover = parser.bufferedByteCount
    return outcome
}

func bytes(_ s: String) -> [UInt8] { Array(s.utf8) }

struct HTTPRequestParserTests {
    static let putBody = #"{"drive_id":"rootfs","path_on_host":"/r.img"}"#
    let put = "PUT /drives/rootfs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: \(Self.putBody.utf8.count)\r\n\r\n"
        + Self.putBody

    @Test func parsesARequestWithABody() throws {
        let outcome = parse(bytes(put))
        let r = try #require(outcome.requests.first)
        #expect(outcome.requests.count == 1 && outcome.error == nil && outcome.leftover == 0)
        #expect(r.method == "PUT" && r.target == "/drives/rootfs" && r.path == "/drives/rootfs" && r.version == "HTTP/1.1")
        #expect(r.header("content-type") == "application/json" && r.header("CONTENT-LENGTH") == "\(Self.putBody.utf8.count)")
        #expect(r.body == bytes(Self.putBody) && r.body.first == UInt8(ascii: "{"))
        #expect(r.keepAlive)
    }

    @Test func everySplitParsesLikeTheWhole() {
        let stream = bytes(put + "GET /vm/config HTTP/1.1\r\n\r\n")
        let whole = parse(stream)
        #expect(whole.requests.count == 2)
        for cut in 1..<stream.count {
            var parser = HTTPRequestParser()
            var got: [HTTPRequest] = []
            parser.append(stream[..<cut])
            while let r = try? parser.next() { got.append(r) }
            parser.append(stream[cut...])
            while let r = try? parser.next() { got.append(r) }
            #expect(got == whole.requests, "cut at \(cut)")
        }
        #expect(parse(stream, chunks: [1]) == whole)
        #expect(parse(stream, chunks: [3, 1, 7]) == whole)
    }

    @Test func pipelinedRequestsComeOutInOrder() {
        let stream = "GET / HTTP/1.1\r\n\r\n" + put + "\r\n" + "PATCH /vm HTTP/1.1\r\nContent-Length: 18\r\n\r\n{\"state\":\"Paused\"}"
            + "GET /version HTTP/1.0\r\n\r\n" + "GET /x HTTP/1.1\r\nConnection: close\r\n\r\nGET /partial HT"
        let outcome = parse(bytes(stream))
        #expect(outcome.requests.map(\.target) == ["/", "/drives/rootfs", "/vm", "/version", "/x"])
        #expect(outcome.requests.map(\.keepAlive) == [true, true, true, false, false])
        #expect(String(decoding: outcome.requests[2].body, as: UTF8.self) == #"{"state":"Paused"}"#)
        #expect(outcome.error == nil && outcome.leftover == "GET /partial HT".utf8.count)
    }

    @Test func toleratesBareLineFeedsAndAbsoluteTargets() throws {
        let outcome = parse(bytes("GET http://localhost/machine-config?x=1 HTTP/1.1\nHost: localhost\n\n"))
        let r = try #require(outcome.requests.first)
        #expect(r.path == "/machine-config")
        #expect(r.header("Host") == "localhost")
    }

    @Test func limitsAreEnforced() {
        let big = String(repeating: "a", count: 8 * 1024)
        #expect(parse(bytes("GET / HTTP/1.1\r\nX-Big: \(big)\r\n\r\n")).error?.status == 431)
        // Without an end of head in sight, the parser gives up as soon as 8 KiB have arrived.
        #expect(parse(bytes("GET /\(big)"), chunks: [100]).error?.status == 431)
        let justFits = "GET / HTTP/1.1\r\nX: " + String(repeating: "a", count: 8 * 1024 - 23) + "\r\n\r\n"
        #expect(justFits.utf8.count == 8 * 1024)
        #expect(parse(bytes(justFits)).requests.count == 1)

        let headers = (0..<64).map { "X-\($0): v\r\n" }.joined()
        #expect(parse(bytes("GET / HTTP/1.1\r\n\(headers)\r\n")).requests.first?.headers.count == 64)
        #expect(parse(bytes("GET / HTTP/1.1\r\n\(headers)X-65: v\r\n\r\n")).error?.status == 431)

        // The body limit is checked from Content-Length, before any body byte is buffered.
        #expect(parse(bytes("PUT /vsock HTTP/1.1\r\nContent-Length: 65537\r\n\r\n")).error?.status == 413)
        let body = String(repeating: " ", count: 64 * 1024)
        #expect(parse(bytes("PUT /vsock HTTP/1.1\r\nContent-Length: 65536\r\n\r\n\(body)")).requests.first?.body.count == 65536)

        let small = HTTPRequestParser.Limits(maxHeadBytes: 64, maxBodyBytes: 4, maxHeaderCount: 1)
        #expect(parse(bytes("PUT / HTTP/1.1\r\nContent-Length: 5\r\n\r\nabcde"), limits: small).error?.status == 413)
        #expect(parse(bytes("GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n"), limits: small).error?.status == 431)
    }

    @Test func chunkedBodiesAreRefusedClearly() throws {
        let error = try #require(parse(bytes("PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")).error)
        #expect(error.status == 501)
        #expect(error.message.contains("Transfer-Encoding") && error.message.contains("Content-Length"))
        #expect(error.response.faultMessage == error.message)
    }

    @Test(arguments: [
        ("GARBAGE\r\n\r\n", 400),
        ("GET /\r\n\r\n", 400),
        ("GET  / HTTP/1.1\r\n\r\n", 400),
        ("GET / HTTP/1.1 extra\r\n\r\n", 400),
        ("G(T / HTTP/1.1\r\n\r\n", 400),
        ("GET / HTTP/2.0\r\n\r\n", 505),
        ("GET / FTP/1.1\r\n\r\n", 400),
        ("GET relative HTTP/1.1\r\nNo-Colon\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\n: empty-name\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nBad Name: v\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nA: 1\r\n folded\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nA: x\u{01}y\r\n\r\n", 400),
        ("PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        ("PUT / HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n", 400),
        ("PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n", 400),
        ("PUT / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc", 400),
        ("GET /\u{7F} HTTP/1.1\r\n\r\n", 400),
    ])
    func malformedInputIsAParseError(_ input: String, _ status: Int) {
        let outcome = parse(bytes(input))
        #expect(outcome.requests.isEmpty)
        #expect(outcome.error?.status == status, "\(outcome)")
    }

    @Test func aFailedParserStaysFailed() {
        var parser = HTTPRequestParser()
        parser.append(bytes("BAD\r\n\r\n"))
        #expect(throws: HTTPParseError.self) { try parser.next() }
        parser.append(bytes("GET / HTTP/1.1\r\n\r\n"))
        #expect(throws: HTTPParseError.self) { try parser.next() }
        #expect(parser.bufferedByteCount == 0)
    }

    @Test func expectContinueIsOfferedOnceUntilTheBodyArrives() throws {
        var parser = HTTPRequestParser()
        parser.append(bytes("PUT /vsock HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"))
        #expect(try parser.next() == nil)
        let first = parser.takeContinueRequest(), second = parser.takeContinueRequest()
        #expect(first && !second)
        parser.append(bytes("{}"))
        #expect(try parser.next()?.body == bytes("{}"))
        let afterBody = parser.takeContinueRequest()
        #expect(!afterBody)
    }

    @Test func responsesAreFramed() {
        let ok = String(decoding: HTTPResponse.json(["a": 1]).serialized(keepAlive: true), as: UTF8.self)
        #expect(ok == "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}")
        let none = String(decoding: HTTPResponse.noContent.serialized(keepAlive: false), as: UTF8.self)
        #expect(none == "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        #expect(HTTPResponse.fault(400, "no \"quotes\" lost").faultMessage == "no \"quotes\" lost")
    }

    /// Random bytes and mutated requests, in random chunks: the parser never traps, always ends in
    /// requests or an error, returns bodies exactly as long as declared, and reaches the same
    /// outcome however the stream is cut.
    @Test func arbitraryInputNeverCrashesAndIsChunkingIndependent() {
        var rng = SeededGenerator(state: 0x5EED_CAFE)
        let seeds = [put, "GET / HTTP/1.1\r\n\r\n", "PATCH /vm HTTP/1.1\r\nContent-Length: 18\r\n\r\n{\"state\":\"Paused\"}",
                     "PUT /actions HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}GET /version HTTP/1.0\r\n\r\n"]
        let alphabet = bytes("GETPU /\r\n:0123456789 Content-Length\t\u{0}\u{7F}")
        let small = HTTPRequestParser.Limits(maxHeadBytes: 256, maxBodyBytes: 64, maxHeaderCount: 4)
        var sawRequests = 0, sawErrors = 0, sawIncomplete = 0
        for i in 0..<3000 {
            var input: [UInt8]
            switch i % 3 {
            case 0:
                // Ended by a blank line, so the head is complete and must be judged.
                input = (0..<Int.random(in: 0...300, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) } + bytes("\r\n\r\n")
            case 1:
                input = (0..<Int.random(in: 0...300, using: &rng)).map { _ in alphabet.randomElement(using: &rng)! } + bytes("\r\n\r\n")
            default:
                input = bytes(seeds.randomElement(using: &rng)! + seeds.randomElement(using: &rng)!)
                for _ in 0..<Int.random(in: 0...4, using: &rng) where !input.isEmpty {
                    let at = Int.random(in: 0..<input.count, using: &rng)
                    switch Int.random(in: 0..<3, using: &rng) {
                    case 0: input[at] = UInt8.random(in: 0...255, using: &rng)
                    case 1: input.remove(at: at)
                    default: input.insert(alphabet.randomElement(using: &rng)!, at: at)
                    }
                }
            }
            let limits = i % 2 == 0 ? HTTPRequestParser.Limits() : small
            let whole = parse(input, limits: limits)
            let chunks = (0..<5).map { _ in Int.random(in: 1...17, using: &rng) }
            let cut = parse(input, chunks: chunks, limits: limits)
            #expect(cut.requests == whole.requests, "case \(i)")
            #expect(cut.error == whole.error, "case \(i)")
            if whole.error == nil { #expect(whole.leftover == cut.leftover && whole.leftover <= input.count) }
            for r in whole.requests {
                #expect(r.body.count == Int(r.header("Content-Length") ?? "0"), "case \(i)")
                #expect(r.body.count <= limits.maxBodyBytes)
            }
            sawRequests += whole.requests.count
            sawErrors += whole.error == nil ? 0 : 1
            sawIncomplete += whole.error == nil && whole.leftover > 0 ? 1 : 0
        }
        // The generator reaches both ends.
        #expect(sawRequests > 500 && sawErrors > 1500 && sawIncomplete > 0)
    }
}
