import Foundation
import Glibc
import Testing
@testable import VMMAPI

/// A raw unix-socket client: writes bytes, reads framed responses (5 s receive timeout, so a
/// server that never answers fails the test instead of hanging it).
final class RawClient {
    let fd: Int32
    private var pending: [UInt8] = []

    struct Response {
        var statusLine: String
        var headers: [String: String]
        var body: String
        var status: Int { Int(statusLine.split(separator: " ")[1]) ?? 0 }
    }

    init(_ path: String) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in for (i, b) in path.utf8.enumerated() { raw[i] = b } }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { close(fd); throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { close(fd) }

    func send(_ text: String) { send(Array(text.utf8)) }
    func send(_ bytes: [UInt8]) {
        _ = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    /// Reads more bytes; false on end of stream, error or timeout.
    private func fill() -> Bool {
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        guard n > 0 else { return false }
        pending += buffer[0..<n]
        return true
    }

    /// The next response, nil if the server closed the connection (or went silent) first.
    func response() -> Response? {
        let crlf2: [UInt8] = [13, 10, 13, 10]
        var headEnd: Int?
        while true {
            if pending.count >= 4, let i = (0...(pending.count - 4)).first(where: { Array(pending[$0..<$0 + 4]) == crlf2 }) {
                headEnd = i
                break
            }
            guard fill() else { return nil }
        }
        let head = String(decoding: pending[..<headEnd!], as: UTF8.self).components(separatedBy: "\r\n")
        var headers: [String: String] = [:]
        for line in head.dropFirst() {
            let parts = line.split(separator: ":", maxSplits: 1)
            headers[parts[0].lowercased()] = parts.count > 1 ? parts[1].trimmingCharacters(in: .whitespaces) : ""
        }
        let length = Int(headers["content-length"] ?? "0") ?? 0
        let start = headEnd! + 4
        while pending.count < start + length { guard fill() else { return nil } }
        let body = String(decoding: pending[start..<start + length], as: UTF8.self)
        pending.removeFirst(start + length)
        return Response(statusLine: head[0], headers: headers, body: body)
    }

    /// Sends one request with a Content-Length body and reads its response.
    func request(_ method: String, _ path: String, _ body: String? = nil) -> Response? {
        var text = "\(method) \(path) HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
        if let body { text += "Content-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)" } else { text += "\r\n" }
        send(text)
        return response()
    }

    /// True once the server has closed its end (reads end-of-stream, not a timeout).
    func isClosedByServer() -> Bool {
        var byte: UInt8 = 0
        return recv(fd, &byte, 1, 0) == 0
    }
}

func temporarySocketPath() -> String {
    "/tmp/mvm-api-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
}

@Suite(.serialized)
struct APIServerTests {
    func withServer(timeoutMilliseconds: Int = 5000, maxConnections: Int = 16,
                    _ body: (APIServer, FakeController, String) throws -> Void) throws {
        let path = temporarySocketPath()
        let fake = FakeController()
        let server = APIServer(socketPath: path, router: APIRouter(controller: fake, instanceID: "sock-vm", vmmVersion: "0.1.0"),
                               requestTimeoutMilliseconds: timeoutMilliseconds, maxConnections: maxConnections)
        try server.start()
        defer { server.stop() }
        try body(server, fake, path)
    }

    @Test func drivesAWholeLifecycleOverTheSocket() throws {
        try withServer { _, fake, path in
            let c = try RawClient(path)
            let steps: [(String, String, String?, String)] = [
                ("GET", "/", nil, "HTTP/1.1 200 OK"),
                ("PUT", "/machine-config", #"{"vcpu_count": 2, "mem_size_mib": 256}"#, "HTTP/1.1 204 No Content"),
                ("PUT", "/boot-source", #"{"kernel_image_path": "/k/vmlinux", "boot_args": "console=ttyS0 reboot=k"}"#, "HTTP/1.1 204 No Content"),
                ("PUT", "/drives/rootfs", #"{"drive_id": "rootfs", "path_on_host": "/i/root.ext4", "is_root_device": true, "is_read_only": false}"#, "HTTP/1.1 204 No Content"),
                ("PUT", "/actions", #"{"action_type": "InstanceStart"}"#, "HTTP/1.1 204 No Content"),
                ("PUT", "/drives/rootfs", #"{"drive_id": "rootfs", "path_on_host": "/x", "is_root_device": true}"#, "HTTP/1.1 400 Bad Request"),
                ("PATCH", "/vm", #"{"state": "Paused"}"#, "HTTP/1.1 204 No Content"),
                ("PATCH", "/vm", #"{"state": "Paused"}"#, "HTTP/1.1 400 Bad Request"),
                ("PATCH", "/vm", #"{"state": "Resumed"}"#, "HTTP/1.1 204 No Content"),
                ("PUT", "/actions", #"{"action_type": "SendCtrlAltDel"}"#, "HTTP/1.1 204 No Content"),
            ]
            for (method, target, body, status) in steps {
                let r = try #require(c.request(method, target, body), "\(method) \(target)")
                #expect(r.statusLine == status, "\(method) \(target): \(r.body)")
                if r.status == 204 { #expect(r.body.isEmpty && r.headers["content-length"] == nil) }
                if r.status == 400 {
                    #expect(r.headers["content-type"] == "application/json")
                    #expect(r.body.contains("fault_message"))
                }
            }
            #expect(fake.calls == ["start", "pause", "resume", "sendCtrlAltDel"])
            #expect(fake.startedWith?.machineConfig.vcpuCount == 2)
            #expect(fake.startedWith?.drives.first?.pathOnHost == "/i/root.ext4")

            let info = try #require(c.request("GET", "/"))
            #expect(info.body == #"{"app_name":"mvm-vmm","id":"sock-vm","state":"Running","vmm_version":"0.1.0"}"#)
            let config = try #require(c.request("GET", "/vm/config"))
            #expect(config.status == 200 && config.body.contains(#""kernel_image_path":"/k/vmlinux""#))
            let metrics = try #require(c.request("GET", "/metrics"))
            #expect(metrics.headers["content-type"] == "text/plain; version=0.0.4" && metrics.body == "mvm_vcpu_exits_total 42\n")
        }
    }

    @Test func pipelinedRequestsAreAnsweredInOrderAndCloseIsHonoured() throws {
        try withServer { _, _, path in
            let c = try RawClient(path)
            let vsock = #"{"guest_cid": 9, "uds_path": "/v.s"}"#
            c.send("GET /version HTTP/1.1\r\n\r\nPUT /vsock HTTP/1.1\r\nContent-Length: \(vsock.utf8.count)\r\n\r\n\(vsock)"
                + "\r\nGET /nope HTTP/1.1\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n")
            #expect(c.response()?.body == #"{"firecracker_version":"1.7.0"}"#)
            #expect(c.response()?.status == 204)
            let nope = try #require(c.response())
            #expect(nope.status == 400 && nope.body.contains("GET /nope") && nope.headers["connection"] == "close")
            // Nothing after the request that asked to close is answered.
            #expect(c.response() == nil)
        }
    }

    @Test func expectContinueGetsAnInterimResponse() throws {
        try withServer { _, _, path in
            let c = try RawClient(path)
            let body = #"{"metrics_path": "/tmp/m"}"#
            c.send("PUT /metrics HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: \(body.utf8.count)\r\n\r\n")
            #expect(c.response()?.statusLine == "HTTP/1.1 100 Continue")
            c.send(body)
            #expect(c.response()?.status == 204)
        }
    }

    @Test func garbageGetsA400AndTheNextClientIsServed() throws {
        try withServer { _, _, path in
            let bad = try RawClient(path)
            bad.send([0, 1, 2, 255, 13, 10, 13, 10])
            let r = try #require(bad.response())
            #expect(r.status == 400 && r.headers["connection"] == "close" && r.body.contains("fault_message"))
            #expect(bad.isClosedByServer())

            let chunked = try RawClient(path)
            chunked.send("PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            #expect(chunked.response()?.status == 501)

            let next = try RawClient(path)
            #expect(next.request("GET", "/")?.status == 200)
        }
    }

    @Test func aClientHangingUpMidBodyDoesNotDisturbTheServer() throws {
        try withServer { _, fake, path in
            do {
                let quitter = try RawClient(path)
                quitter.send("PUT /boot-source HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"kernel_image_path\": ")
            }  // closed here, 80 bytes short
            do {
                let quitter = try RawClient(path)
                quitter.send("PUT /machine-con")
            }
            let next = try RawClient(path)
            #expect(next.request("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 64}"#)?.status == 204)
            #expect(next.request("GET", "/vm/config")?.body.contains("boot-source") == false)
            #expect(fake.calls.isEmpty)
        }
    }

    @Test func aSlowClientBlocksNobodyAndTimesOut() throws {
        try withServer(timeoutMilliseconds: 300) { _, _, path in
            let slow = try RawClient(path)
            slow.send("PUT /vsock HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
            let idle = try RawClient(path)  // connected, says nothing
            let clock = ContinuousClock()
            let start = clock.now
            let fast = try RawClient(path)
            #expect(fast.request("GET", "/version")?.status == 200)
            #expect(clock.now - start < .milliseconds(250))
            let timedOut = try #require(slow.response())
            #expect(timedOut.status == 408)
            #expect(slow.isClosedByServer())
            // A connection between requests is not timed out.
            #expect(idle.request("GET", "/")?.status == 200)
        }
    }

    @Test func theLongestIdleConnectionMakesRoomAtTheCap() throws {
        try withServer(maxConnections: 2) { _, _, path in
            let a = try RawClient(path)
            #expect(a.request("GET", "/")?.status == 200)
            let b = try RawClient(path)
            #expect(b.request("GET", "/")?.status == 200)
            let c = try RawClient(path)
            #expect(c.request("GET", "/")?.status == 200)
            #expect(a.isClosedByServer())
            #expect(b.request("GET", "/version")?.status == 200)
        }
    }

    @Test func aLiveSocketIsRefusedAStaleOneReplacedAndStopCleansUp() throws {
        try withServer { server, _, path in
            let second = APIServer(socketPath: path, router: APIRouter(controller: FakeController(), vmmVersion: "0"))
            #expect(throws: APIServerError.alreadyServing(path)) { try second.start() }
            #expect(throws: APIServerError.alreadyStarted) { try server.start() }
            let client = try RawClient(path)
            #expect(client.request("GET", "/")?.status == 200)
        }

        // A socket file nobody listens on (a crashed VMM's) is replaced.
        let stale = temporarySocketPath()
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in for (i, b) in stale.utf8.enumerated() { raw[i] = b } }
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        close(fd)
        #expect(bound == 0 && access(stale, F_OK) == 0)
        let server = APIServer(socketPath: stale, router: APIRouter(controller: FakeController(), vmmVersion: "0"))
        try server.start()
        let client = try RawClient(stale)
        #expect(client.request("GET", "/version")?.status == 200)
        server.stop()
        #expect(access(stale, F_OK) != 0)
        server.stop()

        // A regular file is never deleted.
        let file = temporarySocketPath()
        #expect(FileManager.default.createFile(atPath: file, contents: Data("keep".utf8)))
        defer { unlink(file) }
        let refused = APIServer(socketPath: file, router: APIRouter(controller: FakeController(), vmmVersion: "0"))
        #expect(throws: APIServerError.notASocket(file)) { try refused.start() }
        #expect(FileManager.default.contents(atPath: file) == Data("keep".utf8))

        let long = "/tmp/" + String(repeating: "x", count: 120)
        #expect(throws: APIServerError.pathTooLong(long)) {
            try APIServer(socketPath: long, router: APIRouter(controller: FakeController(), vmmVersion: "0")).start()
        }
    }
}
