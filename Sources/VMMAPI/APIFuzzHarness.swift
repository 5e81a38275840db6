import Synchronization

/// Drives the API's request parser and router with hostile bytes, as a client on the socket
/// could send them: the input arrives in pieces (cut where the input says), every request the
/// parser makes is routed, and half the time the input is a body behind a well-formed request
/// line for one of the served paths, so the JSON bodies are reached too. A controller that only
/// moves between states stands in for the VMM. Nothing may trap, hang or grow without bound.
///
/// ```swift
/// let h = APIFuzzHarness()
/// h.run(Array("PUT /machine-config HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".utf8))
/// ```
public final class APIFuzzHarness: Sendable {
    public init() {}

    static let targets = [("PUT", "/machine-config"), ("PATCH", "/machine-config"), ("PUT", "/boot-source"), ("PUT", "/drives/rootfs"),
                          ("PUT", "/network-interfaces/eth0"), ("PUT", "/vsock"), ("PUT", "/logger"), ("PUT", "/metrics"),
                          ("PUT", "/actions"), ("PATCH", "/vm"), ("GET", "/"), ("GET", "/vm/config")]

    /// Layout of `input`: [0] bit 0 chooses raw bytes (0) or a served request line with the
    /// rest as its body (1), bits 1-4 the target; [1] the piece size the bytes arrive in.
    /// Returns how many requests were routed.
    @discardableResult
    public func run(_ input: [UInt8]) -> Int {
        guard input.count >= 2 else { return 0 }
        var bytes = Array(input.dropFirst(2))
        if input[0] & 1 == 1 {
            let (method, path) = Self.targets[Int(input[0] >> 1) % Self.targets.count]
            bytes = Array("\(method) \(path) HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: \(bytes.count)\r\n\r\n".utf8) + bytes
        }
        // A VMM of its own per input: one that started stays started.
        let router = APIRouter(controller: StateOnlyController(), vmmVersion: "fuzz")
        var parser = HTTPRequestParser()
        let piece = max(1, Int(input[1]))
        var routed = 0, at = 0
        while at < bytes.count {
            parser.append(bytes[at..<min(bytes.count, at + piece)])
            at += piece
            _ = parser.takeContinueRequest()
            while true {
                do {
                    guard let request = try parser.next() else { break }
                    _ = router.handle(request).serialized(keepAlive: true)
                    routed += 1
                } catch {
                    return routed  // the server answers 400 and closes the connection
                }
            }
        }
        return routed
    }
}

/// A VMM that only changes state: what the router checks (started twice, paused while not
/// running) still applies.
final class StateOnlyController: VMMController {
    private let current = Mutex(InstanceState.notStarted)
    var state: InstanceState { current.withLock { $0 } }
    func start(_ config: VMConfiguration) throws { current.withLock { $0 = .running } }
    func pause() throws { current.withLock { $0 = .paused } }
    func resume() throws { current.withLock { $0 = .running } }
    func sendCtrlAltDel() throws {}
    func metricsText() -> String { "mvm_fuzz 1\n" }
}
