import Foundation
import MicroVMCore
#if canImport(Glibc)
import Glibc
#endif

/// Gives a cell a deadline. A backend that hangs (a server that never exits, a runtime stuck in a
/// syscall) must cost one cell, not the run: past the deadline the cell's work is abandoned and
/// every process it started is killed.
enum Watchdog {
    struct TimedOut: Error, CustomStringConvertible {
        var seconds: Double
        var killed: Int
        var description: String { "timed out after \(Int(seconds.rounded())) s (\(killed) leftover process\(killed == 1 ? "" : "es") killed)" }
    }

    /// Runs `body`, or throws `TimedOut` after `seconds` and kills the processes it left.
    /// `owned` narrows which new descendants count as the cell's (tests sharing a process with others).
    static func run<T: Sendable>(seconds: Double, cleanup: @escaping @Sendable () async -> Void = {},
                                 owned: @escaping @Sendable (Int32) -> Bool = { _ in true },
                                 _ body: @escaping @Sendable () async throws -> T) async throws -> T {
        let before = descendants()
        let once = Once<Result<T, any Error>>()
        let work = Task { once.set(await Result(awaiting: { try await body() })) }
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if let r = once.value { return try r.get() }
            try? await Task.sleep(nanoseconds: 20_000_000)
        }
        if let r = once.value { return try r.get() }
        work.cancel()
        // The backend's own stop first (containers whose processes are not our children), then
        // whatever the cell spawned below this process.
        await cleanup()
        var killed = 0
        for _ in 0..<3 {
            let left = descendants().subtracting(before).filter(owned)
            if left.isEmpty { break }
            for pid in left { kill(pid, SIGKILL); killed += 1 }
            try? await Task.sleep(nanoseconds: 200_000_000)
        }
        throw TimedOut(seconds: seconds, killed: killed)
    }

    /// This process's descendants, from /proc.
    static func descendants(of root: Int32 = getpid()) -> Set<Int32> {
        let table = ProcessMemory.table()
        var children: [Int32: [Int32]] = [:]
        for e in table.values { children[e.ppid, default: []].append(e.pid) }
        var seen = Set<Int32>(), stack = children[root] ?? []
        while let p = stack.popLast() {
            guard seen.insert(p).inserted else { continue }
            stack.append(contentsOf: children[p] ?? [])
        }
        return seen
    }
}

/// A value set once from any thread.
final class Once<T: Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: T?
    var value: T? { lock.withLock { stored } }
    func set(_ v: T) { lock.withLock { if stored == nil { stored = v } } }
}

extension Result where Failure == any Error {
    init(awaiting body: () async throws -> Success) async {
        do { self = .success(try await body()) } catch { self = .failure(error) }
    }
}
