import FoundationEssentials

/// One header field as it arrived (name case preserved; compare with `HTTPRequest.header(_:)`).
public struct HTTPHeader: Sendable, Equatable {
    public var name: String
    public var value: String
    public init(_ name: String, _ value: String) { self.name = name; self.value = value }
}

/// A complete HTTP/1.x request: request line, header fields and the `Content-Length` body.
public struct HTTPRequest: Sendable, Equatable {
    public var method: String
    /// The request target as sent, query included (`/drives/rootfs`).
    public var target: String
    /// `HTTP/1.1` or `HTTP/1.0`.
    public var version: String
    public var headers: [HTTPHeader]
    public var body: [UInt8]

    public init(method: String, target: String, version: String = "HTTP/1.1", headers: [HTTPHeader] = [], body: [UInt8] = []) {
        self.method = method; self.target = target; self.version = version; self.headers = headers; self.body = body
    }

    /// The target's path: without a query, and without `http://host` when the absolute form was sent.
    public var path: String {
        var t = Substring(target)
        if let q = t.firstIndex(where: { $0 == "?" || $0 == "#" }) { t = t[..<q] }
        if t.hasPrefix("http://") || t.hasPrefix("https://") {
            let rest = t.drop { $0 != ":" }.dropFirst(3)
            t = rest.firstIndex(of: "/").map { rest[$0...] } ?? "/"
        }
        return String(t)
    }

    /// The first field with this name, compared case-insensitively.
    public func header(_ name: String) -> String? {
        let lower = name.lowercased()
        return headers.first { $0.name.lowercased() == lower }?.value
    }

    /// Whether the client asked to keep the connection open (HTTP/1.1's default; HTTP/1.0 only with `Connection: keep-alive`).
    public var keepAlive: Bool {
        let tokens = (header("Connection") ?? "").lowercased().split(separator: ",").map { $0.filter { $0 != " " && $0 != "\t" } }
        if tokens.contains("close") { return false }
        return version == "HTTP/1.1" || tokens.contains("keep-alive")
    }
}

/// A response; `serialized(keepAlive:)` adds the status line, `Content-Length` and `Connection`.
public struct HTTPResponse: Sendable, Equatable {
    public var status: Int
    public var headers: [HTTPHeader]
    public var body: [UInt8]

    public init(status: Int, headers: [HTTPHeader] = [], body: [UInt8] = []) {
        self.status = status; self.headers = headers; self.body = body
    }

    /// 204: what every successful PUT, PATCH and action answers.
    public static let noContent = HTTPResponse(status: 204)

    /// `value` as JSON (keys sorted, so the same value always reads the same).
    public static func json(_ value: some Encodable, status: Int = 200) -> HTTPResponse {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        let body = (try? encoder.encode(value)).map { [UInt8]($0) } ?? Array("{}".utf8)
        return HTTPResponse(status: status, headers: [HTTPHeader("Content-Type", "application/json")], body: body)
    }

    /// Firecracker's error body, `{"fault_message": "..."}`.
    public static func fault(_ status: Int, _ message: String) -> HTTPResponse {
        json(Fault(faultMessage: message), status: status)
    }

    public static func text(_ text: String, contentType: String, status: Int = 200) -> HTTPResponse {
        HTTPResponse(status: status, headers: [HTTPHeader("Content-Type", contentType)], body: Array(text.utf8))
    }

    /// The `fault_message` of an error response, if the body is one.
    public var faultMessage: String? { try? JSONDecoder().decode(Fault.self, from: Data(body)).faultMessage }

    /// The bytes on the wire. 1xx and 204 carry neither a body nor `Content-Length` (RFC 9110 §8.6).
    public func serialized(keepAlive: Bool) -> [UInt8] {
        var head = "HTTP/1.1 \(status) \(HTTPResponse.reasonPhrase(status))\r\n"
        for h in headers { head += "\(h.name): \(h.value)\r\n" }
        let bodyless = status == 204 || (100..<200).contains(status)
        if !bodyless { head += "Content-Length: \(body.count)\r\n" }
        head += keepAlive ? "" : "Connection: close\r\n"
        head += "\r\n"
        return Array(head.utf8) + (bodyless ? [] : body)
    }

    public static func reasonPhrase(_ status: Int) -> String {
        switch status {
        case 100: "Continue"
        case 200: "OK"
        case 204: "No Content"
        case 400: "Bad Request"
        case 404: "Not Found"
        case 405: "Method Not Allowed"
        case 408: "Request Timeout"
        case 413: "Content Too Large"
        case 431: "Request Header Fields Too Large"
        case 500: "Internal Server Error"
        case 501: "Not Implemented"
        case 505: "HTTP Version Not Supported"
        default: "Status \(status)"
        }
    }

    struct Fault: Codable {
        var faultMessage: String
        enum CodingKeys: String, CodingKey { case faultMessage = "fault_message" }
    }
}

/// Why bytes are not a request. The connection answers with `response` and closes:
/// after a framing error nothing later on it can be trusted.
public struct HTTPParseError: Error, Sendable, Equatable, CustomStringConvertible {
    /// 400, 413 (body too large), 431 (head too large), 501 (`Transfer-Encoding`) or 505 (not HTTP/1.x).
    public var status: Int
    public var message: String
    public init(status: Int, _ message: String) { self.status = status; self.message = message }
    public var description: String { "\(status): \(message)" }
    public var response: HTTPResponse { .fault(status, message) }
}

/// An incremental HTTP/1.1 request parser: `append` bytes as they arrive, in any chunks, then
/// call `next()` until it returns nil (needs more bytes) or throws (the stream is malformed;
/// every later call throws the same error). Bodies are framed by `Content-Length` only.
public struct HTTPRequestParser: Sendable {
    public struct Limits: Sendable, Equatable {
        /// Request line and header fields together, terminating blank line included.
        public var maxHeadBytes: Int
        public var maxBodyBytes: Int
        public var maxHeaderCount: Int
        public init(maxHeadBytes: Int = 8 * 1024, maxBodyBytes: Int = 64 * 1024, maxHeaderCount: Int = 64) {
            self.maxHeadBytes = maxHeadBytes; self.maxBodyBytes = maxBodyBytes; self.maxHeaderCount = maxHeaderCount
        }
    }

    public let limits: Limits
    private var buffer: [UInt8] = []
    /// Where the next request starts in `buffer`.
    private var start = 0
    /// How far the search for the end of the current head has got (so byte-at-a-time feeding stays linear).
    private var scanned = 0
    /// A parsed head waiting for its body.
    private var pending: (request: HTTPRequest, bodyLength: Int)?
    private var continueOwed = false
    private var failure: HTTPParseError?

    public init(limits: Limits = Limits()) { self.limits = limits }

    public mutating func append(_ bytes: some Sequence<UInt8>) {
        guard failure == nil else { return }
        buffer.append(contentsOf: bytes)
    }

    /// Bytes received that are not yet part of a returned request (a client that hangs up
    /// while this is non-zero did so mid-request).
    public var bufferedByteCount: Int { buffer.count - start }

    /// True once, when a head with `Expect: 100-continue` has arrived and its body has not:
    /// the server should send `100 Continue` (curl waits a second for it before a large body).
    public mutating func takeContinueRequest() -> Bool {
        defer { continueOwed = false }
        return continueOwed
    }

    /// The next complete request, nil if more bytes are needed.
    public mutating func next() throws(HTTPParseError) -> HTTPRequest? {
        if let failure { throw failure }
        do {
            return try parseNext()
        } catch {
            failure = error
            buffer = []; start = 0; scanned = 0; pending = nil
            throw error
        }
    }

    private mutating func parseNext() throws(HTTPParseError) -> HTTPRequest? {
        if pending == nil {
            // RFC 9112 §2.2: ignore blank lines before a request line (some clients send CRLF after a body).
            while start < buffer.count, buffer[start] == 13 || buffer[start] == 10 { start += 1 }
            scanned = max(scanned, start)
            guard let headEnd = findHeadEnd() else {
                if buffer.count - start > limits.maxHeadBytes {
                    throw HTTPParseError(status: 431, "request line and headers exceed \(limits.maxHeadBytes) bytes")
                }
                compact()
                return nil
            }
            if headEnd - start > limits.maxHeadBytes {
                throw HTTPParseError(status: 431, "request line and headers exceed \(limits.maxHeadBytes) bytes")
            }
            let parsed = try parseHead(buffer[start..<headEnd])
            start = headEnd
            scanned = headEnd
            pending = parsed
            if parsed.bodyLength > 0, parsed.request.header("Expect")?.lowercased() == "100-continue" {
                continueOwed = buffer.count - start < parsed.bodyLength
            }
        }
        guard let waiting = pending, buffer.count - start >= waiting.bodyLength else { return nil }
        let length = waiting.bodyLength
        var complete = waiting.request
        complete.body = Array(buffer[start..<start + length])
        start += length
        scanned = start
        pending = nil
        continueOwed = false
        compact()
        return complete
    }

    /// The index just past the blank line ending the head, if it has arrived.
    private mutating func findHeadEnd() -> Int? {
        var i = scanned
        while i < buffer.count {
            if buffer[i] == 10 {
                // "\n\n" or "\n\r\n" ends the head.
                if i - 1 >= start, buffer[i - 1] == 10 { return i + 1 }
                if i - 2 >= start, buffer[i - 1] == 13, buffer[i - 2] == 10 { return i + 1 }
            }
            i += 1
        }
        scanned = i
        return nil
    }

    private mutating func compact() {
        guard start > 0, start >= buffer.count / 2 || start > 16 * 1024 else { return }
        buffer.removeSubrange(0..<start)
        scanned -= start
        start = 0
    }

    private func parseHead(_ head: ArraySlice<UInt8>) throws(HTTPParseError) -> (request: HTTPRequest, bodyLength: Int) {
        var lines: [ArraySlice<UInt8>] = []
        var lineStart = head.startIndex
        for i in head.indices where head[i] == 10 {
            var line = head[lineStart..<i]
            if line.last == 13 { line = line.dropLast() }
            lines.append(line)
            lineStart = i + 1
        }
        // The last line is the blank terminator.
        while lines.last?.isEmpty == true { lines.removeLast() }
        guard let requestLine = lines.first else { throw HTTPParseError(status: 400, "empty request") }

        let parts = requestLine.split(separator: 32, omittingEmptySubsequences: false)
        guard parts.count == 3 else {
            throw HTTPParseError(status: 400, "malformed request line: expected \"METHOD /path HTTP/1.1\"")
        }
        let (method, target, version) = (parts[0], parts[1], parts[2])
        guard !method.isEmpty, method.allSatisfy(Self.isTokenByte) else {
            throw HTTPParseError(status: 400, "malformed request line: invalid method")
        }
        guard !target.isEmpty, target.allSatisfy({ $0 > 32 && $0 < 127 }) else {
            throw HTTPParseError(status: 400, "malformed request line: invalid request target")
        }
        let versionText = String(decoding: version, as: UTF8.self)
        guard versionText == "HTTP/1.1" || versionText == "HTTP/1.0" else {
            if versionText.hasPrefix("HTTP/"), versionText.count == 8 {
                throw HTTPParseError(status: 505, "HTTP version \(versionText) is not supported; use HTTP/1.1")
            }
            throw HTTPParseError(status: 400, "malformed request line: invalid HTTP version")
        }

        let fieldLines = lines.dropFirst()
        guard fieldLines.count <= limits.maxHeaderCount else {
            throw HTTPParseError(status: 431, "more than \(limits.maxHeaderCount) header fields")
        }
        var headers: [HTTPHeader] = []
        headers.reserveCapacity(fieldLines.count)
        var contentLength: Int?
        for line in fieldLines {
            if line.first == 32 || line.first == 9 {
                throw HTTPParseError(status: 400, "malformed header: folded header lines are not supported")
            }
            guard let colon = line.firstIndex(of: 58) else {
                throw HTTPParseError(status: 400, "malformed header: no ':' in a header line")
            }
            let name = line[line.startIndex..<colon]
            guard !name.isEmpty, name.allSatisfy(Self.isTokenByte) else {
                throw HTTPParseError(status: 400, "malformed header: invalid header name")
            }
            var value = line[(colon + 1)...]
            while let f = value.first, f == 32 || f == 9 { value = value.dropFirst() }
            while let l = value.last, l == 32 || l == 9 { value = value.dropLast() }
            guard value.allSatisfy({ $0 == 9 || ($0 >= 32 && $0 != 127) }) else {
                throw HTTPParseError(status: 400, "malformed header: control character in a header value")
            }
            let header = HTTPHeader(String(decoding: name, as: UTF8.self), String(decoding: value, as: UTF8.self))
            switch header.name.lowercased() {
            case "transfer-encoding":
                throw HTTPParseError(status: 501, "Transfer-Encoding (\(header.value)) is not supported; send the body with Content-Length")
            case "content-length":
                guard !value.isEmpty, value.count <= 18, value.allSatisfy({ $0 >= 48 && $0 <= 57 }), let n = Int(header.value) else {
                    throw HTTPParseError(status: 400, "malformed header: Content-Length must be a decimal number")
                }
                if let contentLength, contentLength != n {
                    throw HTTPParseError(status: 400, "malformed header: conflicting Content-Length values")
                }
                contentLength = n
            default:
                break
            }
            headers.append(header)
        }
        let length = contentLength ?? 0
        guard length <= limits.maxBodyBytes else {
            throw HTTPParseError(status: 413, "request body of \(length) bytes exceeds \(limits.maxBodyBytes) bytes")
        }
        let request = HTTPRequest(method: String(decoding: method, as: UTF8.self), target: String(decoding: target, as: UTF8.self),
                                  version: versionText, headers: headers)
        return (request, length)
    }

    /// RFC 9110's `tchar`.
    private static func isTokenByte(_ b: UInt8) -> Bool {
        switch b {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"): true
        case UInt8(ascii: "!"), UInt8(ascii: "#"), UInt8(ascii: "$"), UInt8(ascii: "%"), UInt8(ascii: "&"), UInt8(ascii: "'"),
             UInt8(ascii: "*"), UInt8(ascii: "+"), UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "^"), UInt8(ascii: "_"),
             UInt8(ascii: "`"), UInt8(ascii: "|"), UInt8(ascii: "~"): true
        default: false
        }
    }
}
