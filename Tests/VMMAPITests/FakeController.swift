import Synchronization
@testable import VMMAPI

/// A VMM that only records what it was asked and moves between states as a real one would.
final class FakeController: VMMController {
    struct Failure: Error, CustomStringConvertible { var description: String }

    private let current: Mutex<InstanceState>
    private let log = Mutex<[String]>([])
    private let started = Mutex<VMConfiguration?>(nil)
    /// When set, the next call throws this text.
    let failure = Mutex<String?>(nil)
    let metrics: String

    init(state: InstanceState = .notStarted, metrics: String = "mvm_vcpu_exits_total 42\n") {
        current = Mutex(state); self.metrics = metrics
    }

    var state: InstanceState { current.withLock { $0 } }
    var calls: [String] { log.withLock { $0 } }
    var startedWith: VMConfiguration? { started.withLock { $0 } }

    private func record(_ call: String) throws {
        log.withLock { $0.append(call) }
        if let message = failure.withLock({ f -> String? in defer { f = nil }; return f }) { throw Failure(description: message) }
    }

    func start(_ config: VMConfiguration) throws {
        try record("start")
        started.withLock { $0 = config }
        current.withLock { $0 = .running }
    }
    func pause() throws { try record("pause"); current.withLock { $0 = .paused } }
    func resume() throws { try record("resume"); current.withLock { $0 = .running } }
    func sendCtrlAltDel() throws { try record("sendCtrlAltDel") }
    func metricsText() -> String { metrics }
    func setBalloon(amountMib: Int) throws { try record("setBalloon \(amountMib)") }
    func balloonStatistics() throws -> BalloonStatistics {
        try record("balloonStatistics")
        return BalloonStatistics(targetPages: 256, actualPages: 128, guest: ["free_memory": 1 << 20])
    }
    func setBalloonStatisticsInterval(_ seconds: Int) throws { try record("setBalloonStatisticsInterval \(seconds)") }
    /// Whether `setVCPUs` plugs CPUs (as the hosted controller) or says there is no hotplug (as the VMM).
    let cpuHotplug = Mutex(false)
    func setVCPUs(_ count: Int) throws {
        try record("setVCPUs \(count)")
        if !cpuHotplug.withLock({ $0 }) { throw NoCPUHotplug() }
    }
}

extension HTTPRequest {
    static func make(_ method: String, _ path: String, _ body: String? = nil) -> HTTPRequest {
        let bytes = body.map { Array($0.utf8) } ?? []
        var headers = [HTTPHeader("Host", "localhost")]
        if body != nil { headers += [HTTPHeader("Content-Type", "application/json"), HTTPHeader("Content-Length", "\(bytes.count)")] }
        return HTTPRequest(method: method, target: path, headers: headers, body: bytes)
    }
}

extension HTTPResponse {
    var bodyText: String { String(decoding: body, as: UTF8.self) }
}
