import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// A client of `mvm-vmm`'s API: one HTTP/1.1 request per connection over its unix socket, as
/// `curl --unix-socket` sends them. `mvm pause`, `resume` and `stats` use it.
///
/// ```swift
/// let api = APIClient(socketPath: "/var/lib/microvm/instances/vm1/api.sock")
/// let r = try api.send("PATCH", "/vm", body: #"{"state": "Paused"}"#)   // r.status == 204
/// ```
public struct APIClient: Sendable {
    public let socketPath: String
    /// Seconds a request may take, connect to last byte.
    public var timeout: Int32

    public init(socketPath: String, timeout: Int32 = 10) { self.socketPath = socketPath; self.timeout = timeout }

    public struct Response: Sendable {
        public var status: Int
        public var body: String
        /// The `fault_message` of an error response.
        public var faultMessage: String? {
            struct Fault: Decodable { var fault_message: String }
            return (try? JSONDecoder().decode(Fault.self, from: Data(body.utf8)))?.fault_message
        }
    }

    public enum ClientError: Error, CustomStringConvertible {
        case connect(String, Int32)
        case io(String)
        public var description: String {
            switch self {
            case .connect(let path, let e): "cannot connect to the VMM's API at \(path): \(String(cString: strerror(e)))"
            case .io(let what): what
            }
        }
    }

    public func send(_ method: String, _ target: String, body: String? = nil) throws(ClientError) -> Response {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .connect(socketPath, errno) }
        defer { close(fd) }
        var tv = timeval(tv_sec: Int(timeout), tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let path = Array(socketPath.utf8)
        guard path.count < MemoryLayout.size(ofValue: addr.sun_path) else { throw .io("the socket path \(socketPath) is too long") }
        withUnsafeMutableBytes(of: &addr.sun_path) { p in for (i, b) in path.enumerated() { p[i] = b } }
        let ok = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard ok == 0 else { throw .connect(socketPath, errno) }
        var request = "\(method) \(target) HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n"
        if let body { request += "Content-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)" } else { request += "\r\n" }
        let bytes = Array(request.utf8)
        var sent = 0
        while sent < bytes.count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + sent, $0.count - sent) }
            guard n > 0 else { throw .io("the VMM's API closed the connection while the request was sent") }
            sent += n
        }
        var reply: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        while reply.count < 1 << 20 {
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            reply += buf[0..<n]
            if let r = Self.parse(reply), r.complete { return r.response }
        }
        guard let r = Self.parse(reply) else { throw .io("no HTTP response from the VMM's API at \(socketPath)") }
        return r.response
    }

    /// A status line, headers and a body of `Content-Length` bytes (complete once all are in).
    static func parse(_ bytes: [UInt8]) -> (response: Response, complete: Bool)? {
        guard let end = bytes.indices.dropLast(3).first(where: { bytes[$0] == 13 && bytes[$0 + 1] == 10 && bytes[$0 + 2] == 13 && bytes[$0 + 3] == 10 }) else { return nil }
        let head = String(decoding: bytes[..<end], as: UTF8.self).split(separator: "\r\n")
        guard let status = head.first?.split(separator: " ").dropFirst().first.flatMap({ Int($0) }) else { return nil }
        let length = head.dropFirst().first { $0.lowercased().hasPrefix("content-length:") }
            .flatMap { Int($0.split(separator: ":", maxSplits: 1)[1].trimmingCharacters(in: " \t")) } ?? 0
        let body = Array(bytes[(end + 4)...])
        return (Response(status: status, body: String(decoding: body.prefix(length), as: UTF8.self)), body.count >= length)
    }
}

private extension Substring {
    func trimmingCharacters(in set: String) -> Substring {
        var s = self
        while let f = s.first, set.contains(f) { s = s.dropFirst() }
        while let l = s.last, set.contains(l) { s = s.dropLast() }
        return s
    }
}
