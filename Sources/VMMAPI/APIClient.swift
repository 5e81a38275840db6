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
            // MSG_NOSIGNAL: a VMM that closes first is an error here, not a SIGPIPE that ends mvm.
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + sent, $0.count - sent, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw .io("the VMM's API closed the connection while the request was sent") }
            sent += n
        }
        var reply: [UInt8] = []
        var head: Head?
        var buf = [UInt8](repeating: 0, count: 4096)
        while reply.count < Self.maxReply {
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            reply += buf[0..<n]
            if head == nil { head = try Self.head(reply, from: socketPath) }
            if let h = head, reply.count >= h.bodyStart + h.length { break }
        }
        if head == nil { head = try Self.head(reply, from: socketPath) }
        guard let h = head else { throw .io("no HTTP response from the VMM's API at \(socketPath)") }
        let body = reply[min(h.bodyStart, reply.count)...].prefix(h.length)
        return Response(status: h.status, body: String(decoding: body, as: UTF8.self))
    }

    static let maxReply = 1 << 20

    struct Head { var status: Int; var bodyStart: Int; var length: Int }

    /// The status line and `Content-Length` of a reply, once its head is in (nil before).
    static func head(_ bytes: [UInt8], from path: String) throws(ClientError) -> Head? {
        guard let end = bytes.indices.dropLast(3).first(where: { bytes[$0] == 13 && bytes[$0 + 1] == 10 && bytes[$0 + 2] == 13 && bytes[$0 + 3] == 10 }) else { return nil }
        let lines = String(decoding: bytes[..<end], as: UTF8.self).split(separator: "\r\n")
        guard let status = lines.first?.split(separator: " ").dropFirst().first.flatMap({ Int($0) }) else {
            throw .io("the VMM's API at \(path) answered something that is not HTTP")
        }
        var length = 0
        if let field = lines.dropFirst().first(where: { $0.lowercased().hasPrefix("content-length:") }) {
            guard let n = Int(field.dropFirst("content-length:".count).trimmingCharacters(in: " \t")), (0...maxReply).contains(n) else {
                throw .io("the VMM's API at \(path) sent a bad Content-Length (\(field))")
            }
            length = n
        }
        return Head(status: status, bodyStart: end + 4, length: length)
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

extension APIClient {
    /// What became of a balloon resize.
    public enum BalloonOutcome: Sendable, Equatable {
        case done
        /// The guest held only `held` 4 KiB pages of the `wanted` when time ran out; the balloon
        /// was set back to its previous size.
        case notFilled(held: UInt32, wanted: UInt32)
    }

    /// Gives the running machine `count` vCPUs (`PATCH /machine-config`, after InstanceStart).
    public func setVCPUCount(_ count: Int) throws {
        try expectSuccess(send("PATCH", "/machine-config", body: #"{"vcpu_count": \#(count)}"#))
    }

    /// Sets the balloon to `amountMib` (`PATCH /balloon`). A larger balloon is waited for: until
    /// the guest holds it (`GET /balloon/statistics`), or `seconds` pass, when the balloon goes
    /// back to `previousMib`. Errors are the API's: a refused request throws its fault message.
    public func resizeBalloon(to amountMib: Int, from previousMib: Int, waitingUpTo seconds: Double) throws -> BalloonOutcome {
        try expectSuccess(send("PATCH", "/balloon", body: #"{"amount_mib": \#(amountMib)}"#))
        guard amountMib > previousMib else { return .done }
        let wanted = UInt32(amountMib) * 256
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        let deadline = Double(now.tv_sec) + Double(now.tv_nsec) / 1e9 + seconds
        var held: UInt32 = 0
        while true {
            let r = try send("GET", "/balloon/statistics")
            try expectSuccess(r)
            if let stats = try? JSONDecoder().decode(BalloonStatistics.self, from: Data(r.body.utf8)) { held = stats.actualPages }
            if held >= wanted { return .done }
            clock_gettime(CLOCK_MONOTONIC, &now)
            if Double(now.tv_sec) + Double(now.tv_nsec) / 1e9 >= deadline { break }
            usleep(100_000)
        }
        _ = try? send("PATCH", "/balloon", body: #"{"amount_mib": \#(previousMib)}"#)
        return .notFilled(held: held, wanted: wanted)
    }

    private func expectSuccess(_ r: Response) throws(ClientError) {
        guard (200..<300).contains(r.status) else { throw .io(r.faultMessage ?? "the VMM answered \(r.status)") }
    }
}
