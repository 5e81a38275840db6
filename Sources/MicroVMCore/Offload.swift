import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Dispatch

/// Runs blocking work (a runtime's command, a wait on a guest) on GCD's threads, not the
/// cooperative pool, so several at once cannot starve other tasks.
public func offload<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { cont in
        DispatchQueue.global().async {
            do { cont.resume(returning: try body()) } catch { cont.resume(throwing: error) }
        }
    }
}
