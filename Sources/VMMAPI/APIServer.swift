import Glibc
import Synchronization

public enum APIServerError: Error, Equatable, CustomStringConvertible {
    /// A unix socket path holds at most 107 bytes.
    case pathTooLong(String)
    /// Another server answers on this socket.
    case alreadyServing(String)
    /// Something other than a socket is at the path; it is left alone.
    case notASocket(String)
    case alreadyStarted
    case system(String, errno: Int32)

    public var description: String {
        switch self {
        case .pathTooLong(let p): "API socket path is longer than 107 bytes: \(p)"
        case .alreadyServing(let p): "another server is already listening on \(p)"
        case .notASocket(let p): "\(p) exists and is not a socket; not replacing it"
        case .alreadyStarted: "the API server is already started"
        case .system(let what, let e): "\(what): \(String(cString: strerror(e)))"
        }
    }
}

/// The control API on a unix socket: one thread polls the listening socket and every open
/// connection, so requests are handled one at a time (as Firecracker's are) while an idle or
/// slow client blocks nobody. A request must arrive whole within `requestTimeoutMilliseconds`
/// of its first byte, or the connection gets a 408 and is closed; idle keep-alive connections
/// stay open until `maxConnections` is reached, then the longest-idle one makes room.
public final class APIServer: Sendable {
    public let socketPath: String
    public let router: APIRouter
    public let requestTimeoutMilliseconds: Int
    public let maxConnections: Int

    private struct Running: Sendable {
        var listenFD: Int32
        var wakeFD: Int32
        /// nil between `listen()` and `serve()`.
        var thread: pthread_t?
        var inode: ino_t
        var loop: ServeLoop
    }
    private let running = Mutex<Running?>(nil)
    /// Called on the serving thread before it handles anything (a jailed VMM confines the
    /// thread to the API's system calls there).
    public let onServeThread: (@Sendable () -> Void)?
    /// Whether `stop()` removes the socket file. A jailed VMM cannot see it any more, and its
    /// launcher removes it.
    public let removesSocketFile: Bool

    public init(socketPath: String, router: APIRouter, requestTimeoutMilliseconds: Int = 5000, maxConnections: Int = 16,
                removesSocketFile: Bool = true, onServeThread: (@Sendable () -> Void)? = nil) {
        self.socketPath = socketPath; self.router = router
        self.removesSocketFile = removesSocketFile; self.onServeThread = onServeThread
        self.requestTimeoutMilliseconds = requestTimeoutMilliseconds; self.maxConnections = max(1, maxConnections)
    }

    deinit { stop() }

    /// Binds and listens at `socketPath` (a stale socket file there is replaced, a live one is
    /// not), then serves on a thread of its own until `stop()`.
    public func start() throws(APIServerError) {
        try listen()
        try serve()
    }

    /// Binds and listens at `socketPath`, without serving yet: connections wait in the backlog
    /// until `serve()`. A jailed VMM binds before it leaves the host's file system.
    public func listen() throws(APIServerError) {
        try running.withLock { (state: inout Running?) throws(APIServerError) in
            guard state == nil else { throw APIServerError.alreadyStarted }
            let address = try Self.address(socketPath)
            try Self.clearStaleSocket(socketPath, address)

            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            guard fd >= 0 else { throw .system("socket", errno: errno) }
            var addr = address
            let bound = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            guard bound == 0 else { let e = errno; close(fd); throw .system("bind \(socketPath)", errno: e) }
            guard Glibc.listen(fd, 64) == 0 else { let e = errno; close(fd); unlink(socketPath); throw .system("listen", errno: e) }
            var st = stat()
            lstat(socketPath, &st)

            var pipeFDs: [Int32] = [-1, -1]
            guard pipe(&pipeFDs) == 0 else {
                let e = errno; close(fd); unlink(socketPath); throw .system("pipe", errno: e)
            }
            for p in pipeFDs { Self.setNonBlockingCloseOnExec(p) }
            let loop = ServeLoop(listenFD: fd, wakeFD: pipeFDs[0], router: router,
                                 requestTimeout: requestTimeoutMilliseconds, maxConnections: maxConnections)
            state = Running(listenFD: fd, wakeFD: pipeFDs[1], thread: nil, inode: st.st_ino, loop: loop)
        }
    }

    /// Serves what `listen()` bound, on a thread of its own until `stop()`.
    public func serve() throws(APIServerError) {
        try running.withLock { (state: inout Running?) throws(APIServerError) in
            guard var r = state, r.thread == nil else { throw APIServerError.alreadyStarted }
            let box = Unmanaged.passRetained(LoopBox(r.loop, onStart: onServeThread))
            var thread = pthread_t()
            let created = pthread_create(&thread, nil, { context in
                let box = Unmanaged<LoopBox>.fromOpaque(context!).takeRetainedValue()
                box.onStart?()
                box.loop.run()
                return nil
            }, box.toOpaque())
            guard created == 0 else {
                box.release()
                throw .system("pthread_create", errno: created)
            }
            r.thread = thread
            state = r
        }
    }

    /// Stops serving, closes every connection and the socket, and removes the socket file
    /// (if it is still the one this server made). Safe to call more than once.
    public func stop() {
        guard let r = running.withLock({ (state: inout Running?) -> Running? in defer { state = nil }; return state }) else { return }
        var byte: UInt8 = 1
        _ = write(r.wakeFD, &byte, 1)
        if let thread = r.thread { pthread_join(thread, nil) } else { r.loop.closeWakeEnd() }
        close(r.wakeFD)
        close(r.listenFD)
        guard removesSocketFile else { return }
        var st = stat()
        if lstat(socketPath, &st) == 0, st.st_ino == r.inode { unlink(socketPath) }
    }

    public var isRunning: Bool { running.withLock { $0 != nil } }

    static func setNonBlockingCloseOnExec(_ fd: Int32) {
        _ = fcntl(fd, F_SETFD, fcntl(fd, F_GETFD) | FD_CLOEXEC)
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
    }

    private static func address(_ path: String) throws(APIServerError) -> sockaddr_un {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard !bytes.isEmpty, bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { throw .pathTooLong(path) }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
        }
        return addr
    }

    /// Refuses a path where a server answers; removes a socket file nobody listens on.
    private static func clearStaleSocket(_ path: String, _ address: sockaddr_un) throws(APIServerError) {
        var st = stat()
        guard lstat(path, &st) == 0 else { return }
        guard st.st_mode & S_IFMT == S_IFSOCK else { throw .notASocket(path) }
        let probe = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard probe >= 0 else { throw .system("socket", errno: errno) }
        defer { close(probe) }
        var addr = address
        let connected = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(probe, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if connected == 0 { throw .alreadyServing(path) }
        let e = errno
        guard e == ECONNREFUSED else { throw .system("probing \(path)", errno: e) }
        guard unlink(path) == 0 || errno == ENOENT else { throw .system("removing stale socket \(path)", errno: errno) }
    }
}

private final class LoopBox {
    let loop: ServeLoop
    let onStart: (@Sendable () -> Void)?
    init(_ loop: ServeLoop, onStart: (@Sendable () -> Void)?) { self.loop = loop; self.onStart = onStart }
}

/// The serving thread's state; touched by that thread only.
private final class ServeLoop: @unchecked Sendable {
    // SAFETY (Sendable): held in `APIServer.running` between listen() and serve(), and used by
    // the serving thread alone after it; never by two threads at once.
    struct Connection {
        var fd: Int32
        var parser = HTTPRequestParser()
        /// When the request in progress must have arrived whole (nil between requests).
        var deadline: Int?
        var lastActive: Int
    }

    let listenFD: Int32
    let wakeFD: Int32
    let router: APIRouter
    let requestTimeout: Int
    let maxConnections: Int
    var connections: [Connection] = []

    init(listenFD: Int32, wakeFD: Int32, router: APIRouter, requestTimeout: Int, maxConnections: Int) {
        self.listenFD = listenFD; self.wakeFD = wakeFD; self.router = router
        self.requestTimeout = requestTimeout; self.maxConnections = maxConnections
    }

    /// Closes the wake pipe's read end when no thread ever served (run() closes it otherwise).
    func closeWakeEnd() { close(wakeFD) }

    static func now() -> Int {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return ts.tv_sec * 1000 + ts.tv_nsec / 1_000_000
    }

    func run() {
        defer {
            for c in connections { close(c.fd) }
            connections = []
            close(wakeFD)
        }
        var readBuffer = [UInt8](repeating: 0, count: 16 * 1024)
        while true {
            var fds = [pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0), pollfd(fd: listenFD, events: Int16(POLLIN), revents: 0)]
            fds += connections.map { pollfd(fd: $0.fd, events: Int16(POLLIN), revents: 0) }
            let soonest = connections.compactMap(\.deadline).min()
            let timeout = soonest.map { Int32(clamping: max(0, $0 - Self.now())) } ?? -1
            let ready = poll(&fds, nfds_t(fds.count), timeout)
            if ready < 0 {
                if errno == EINTR { continue }
                return
            }
            if fds[0].revents != 0 { return }

            // Serve the connections that were polled (accepting may change the array after).
            var closed = Set<Int32>()
            for (i, p) in fds.dropFirst(2).enumerated() where p.revents != 0 {
                if !serve(&connections[i], &readBuffer) { closed.insert(p.fd) }
            }
            let now = Self.now()
            for i in connections.indices where !closed.contains(connections[i].fd) {
                if let d = connections[i].deadline, d <= now {
                    // A short answer to a client already late: no waiting on its socket for it.
                    send(connections[i].fd, HTTPResponse.fault(408, "the request did not arrive whole within \(requestTimeout) ms")
                        .serialized(keepAlive: false), until: now + 100)
                    closed.insert(connections[i].fd)
                }
            }
            if !closed.isEmpty {
                for c in connections where closed.contains(c.fd) { close(c.fd) }
                connections.removeAll { closed.contains($0.fd) }
            }
            if fds[1].revents != 0 { acceptAll() }
        }
    }

    private func acceptAll() {
        while true {
            let fd = accept(listenFD, nil, nil)
            if fd < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                return
            }
            APIServer.setNonBlockingCloseOnExec(fd)
            if connections.count >= maxConnections {
                // Make room by closing the longest-idle connection between requests; if every
                // connection is mid-request, the newcomer is turned away.
                let idle = connections.indices.filter { connections[$0].deadline == nil }
                guard let oldest = idle.min(by: { connections[$0].lastActive < connections[$1].lastActive }) else {
                    close(fd)
                    continue
                }
                close(connections[oldest].fd)
                connections.remove(at: oldest)
            }
            connections.append(Connection(fd: fd, lastActive: Self.now()))
        }
    }

    /// Reads what is there and answers every complete request; false once the connection is done.
    private func serve(_ c: inout Connection, _ buffer: inout [UInt8]) -> Bool {
        let n = buffer.withUnsafeMutableBytes { read(c.fd, $0.baseAddress, $0.count) }
        if n < 0 { return errno == EAGAIN || errno == EINTR }
        if n == 0 { return false }  // hung up, possibly mid-request: nothing to answer
        c.parser.append(buffer[0..<n])
        c.lastActive = Self.now()
        // One deadline for every answer to this read: a client that pipelines many requests and
        // drains its socket slowly holds the server thread for at most `requestTimeout`.
        let until = c.lastActive + requestTimeout
        while true {
            let request: HTTPRequest?
            do {
                request = try c.parser.next()
            } catch {
                send(c.fd, error.response.serialized(keepAlive: false), until: until)
                return false
            }
            guard let request else { break }
            let response = router.handle(request)
            let keepAlive = request.keepAlive
            guard send(c.fd, response.serialized(keepAlive: keepAlive), until: until), keepAlive else { return false }
        }
        if c.parser.takeContinueRequest() {
            guard send(c.fd, HTTPResponse(status: 100).serialized(keepAlive: true), until: until) else { return false }
        }
        if c.parser.bufferedByteCount == 0 {
            c.deadline = nil
        } else if c.deadline == nil {
            c.deadline = c.lastActive + requestTimeout
        }
        return true
    }

    /// Writes all of `bytes`, waiting for a full socket buffer to drain until `until` (ms, monotonic).
    @discardableResult
    private func send(_ fd: Int32, _ bytes: [UInt8], until: Int) -> Bool {
        var done = 0
        while done < bytes.count {
            let n = bytes[done...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n > 0 { done += n; continue }
            if n < 0 && errno == EINTR { continue }
            guard n < 0, errno == EAGAIN else { return false }
            var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            let left = until - Self.now()
            guard left > 0, poll(&p, 1, Int32(clamping: left)) == 1 else { return false }
        }
        return true
    }
}
