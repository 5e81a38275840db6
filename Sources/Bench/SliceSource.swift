import Foundation
import MicroVMCore
import Allocator

/// Where each bench instance's slice comes from. With an allocator every instance is granted its
/// slice (once, released when it ends), exactly as `mvm run` is, so the bench measures the slices
/// users get; a refusal (say, parallel launches wanting more CPUs than the host has) falls back to
/// an unpinned `shared` slice of the same size, and the results say so.
public final class SliceSource: @unchecked Sendable {
    let allocator: Allocator?
    /// Why there is no allocator (recorded with each fixed slice).
    let fixedReason: String
    private let lock = NSLock()
    private var used: [String: [String: Int]] = [:]

    public init(allocator: Allocator?, fixedReason: String = "allocator not used: the configured slice as is") {
        self.allocator = allocator; self.fixedReason = fixedReason
    }

    /// The configured slice, unchanged: unit tests and runs without a ledger.
    public static var fixed: SliceSource { SliceSource(allocator: nil) }

    /// Opens the host's allocator; a ledger that cannot be opened leaves the configured slice, noted.
    public static func open(config: MicroVMConfig, paths: Paths = .default) -> SliceSource {
        do { return SliceSource(allocator: try Allocator.open(paths: paths, config: config)) }
        catch { return SliceSource(allocator: nil, fixedReason: "allocator could not be opened (\(error)): the configured slice as is") }
    }

    /// A slice for one instance and the call that gives it back.
    func lease(_ wanted: ResourceSlice, owner: String, mode: RunMode, backend: String) -> (slice: ResourceSlice, release: @Sendable () -> Void) {
        guard let allocator else {
            note(backend, "\(Self.describe(wanted)) (\(fixedReason))")
            return (wanted, {})
        }
        let request = SliceRequest(cpus: wanted.cpus, placement: wanted.placement, weight: wanted.cpuWeight, quota: wanted.cpuQuota,
                                   memory: wanted.memory, hugePages: wanted.hugePages, pidsLimit: wanted.pidsLimit,
                                   owner: owner, ownerPID: getpid(), mode: mode.rawValue)
        do {
            let grant = try allocator.allocate(request)
            note(backend, "granted \(Self.describe(grant.slice))")
            let id = grant.id
            return (grant.slice, { _ = try? allocator.release(id) })
        } catch {
            var shared = wanted
            shared.placement = .shared
            shared.cpuSet = []
            note(backend, "\(Self.describe(shared)) (allocator refused: \(Self.firstLine(error)))")
            return (shared, {})
        }
    }

    /// Slice descriptions and how many instances of each backend got them.
    public func usage() -> [String: [String: Int]] { lock.withLock { used } }

    private func note(_ backend: String, _ what: String) { lock.withLock { used[backend, default: [:]][what, default: 0] += 1 } }

    static func describe(_ s: ResourceSlice) -> String {
        "\(s.placement.rawValue) \(s.cpus) CPU\(s.cpus == 1 ? "" : "s")\(s.cpuSet.isEmpty ? "" : " cpuset \(s.cpuSetList)"), \(s.memory)"
    }

    static func firstLine(_ error: any Error) -> String {
        String(String(describing: error).split(separator: "\n").first ?? "").prefix(200).description
    }
}
