import Testing
@testable import VMMAPI

/// The client reads what a VMM sends back; a reply it cannot trust is an error, never a trap.
struct APIClientTests {
    func head(_ text: String) throws -> APIClient.Head? { try APIClient.head(Array(text.utf8), from: "/s") }

    @Test func aReplysHeadGivesItsStatusAndBodyLength() throws {
        let reply = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{\"a\""
        let h = try #require(try head(reply))
        #expect(h.status == 200 && h.length == 12 && h.bodyStart == reply.utf8.count - 4, "the body starts after the blank line")
        #expect(try head("HTTP/1.1 204 No Content\r\n\r\n")?.length == 0)
        #expect(try head("HTTP/1.1 200 OK\r\nContent-Le") == nil, "an unfinished head is not an answer yet")
    }

    @Test(arguments: ["Content-Length:", "Content-Length: -1", "Content-Length: x", "Content-Length: 99999999999"])
    func aBadContentLengthIsAnError(_ field: String) {
        #expect(throws: APIClient.ClientError.self) { try head("HTTP/1.1 200 OK\r\n\(field)\r\n\r\n") }
    }

    @Test func somethingThatIsNotHTTPIsAnError() {
        #expect(throws: APIClient.ClientError.self) { try head("SSH-2.0-OpenSSH\r\n\r\n") }
    }
}
