/// Live resizing: a running instance's grant and its enforcement change together, through the
/// same admission as a launch.
///
/// ```swift
/// let updater = InstanceUpdater(allocator: try Allocator.open(config: try .load()))
/// let grant = try await updater.update(name: "web-1", .init(cpus: 2, memory: .gibibytes(1)), on: backend)
/// ```
import Allocator
import MicroVMCore

public struct InstanceUpdater: Sendable {
    public let allocator: Allocator
    public init(allocator: Allocator) { self.allocator = allocator }

    /// Resizes the instance `name` (the owner of its grant) on `backend`. Everything is checked
    /// before anything changes: the allocator plans the new slice (or refuses it, naming what is
    /// short) and the backend says whether it can take it live. Then the grant grows first and
    /// shrinks last: what grows is granted before it is enforced, what shrinks is enforced
    /// before the ledger gives it back, so the ledger never holds less than the instance may
    /// use, even for a moment. A failed step undoes the steps before it. Returns the new grant.
    @discardableResult
    public func update(name: String, _ change: Allocator.Resize, on backend: any InstanceBackend) async throws -> Grant {
        let planned = try allocator.resize(owner: name, change, commit: false)
        let old = planned.old.slice
        let mode = RunMode(rawValue: planned.old.mode) ?? backend.mode
        func enforced(_ s: ResourceSlice) -> Enforcement { Enforcement(slice: s, mode: mode) }
        try backend.checkUpdate(name: name, from: enforced(old), to: enforced(planned.new.slice))

        // Step 1: the grant covers both the old and the new slice (a growth, granted first).
        var cover = planned.new.slice
        cover.cpus = max(old.cpus, cover.cpus)
        cover.memory = max(old.memory, cover.memory)
        cover.cpuQuota = old.cpuQuota.flatMap { a in cover.cpuQuota.map { max(a, $0) } }
        var current = old
        if !Self.same(cover, old) {
            let grown = try allocator.resize(owner: name, exactly: cover).new.slice
            do {
                try await backend.update(name: name, from: enforced(old), to: enforced(grown))
            } catch {
                _ = try? allocator.resize(owner: name, exactly: old)
                throw error
            }
            current = grown
        }
        // Step 2: down to the new slice (enforced first, then given back).
        let target = planned.new.slice
        guard !Self.same(target, current) else { return try grant(name) }
        do {
            let final = try allocator.resize(owner: name, exactly: target, commit: false).new.slice
            try await backend.update(name: name, from: enforced(current), to: enforced(final))
            do {
                try allocator.resize(owner: name, exactly: target)
            } catch {
                try? await backend.update(name: name, from: enforced(final), to: enforced(current))
                throw error
            }
        } catch {
            // Back to where the instance started: step 1 is undone as well.
            if !Self.same(current, old) {
                try? await backend.update(name: name, from: enforced(current), to: enforced(old))
                _ = try? allocator.resize(owner: name, exactly: old)
            }
            throw error
        }
        return try grant(name)
    }

    func grant(_ owner: String) throws -> Grant {
        guard let g = try allocator.grants().first(where: { $0.owner == owner }) else {
            throw MicroVMError.notFound("the grant of '\(owner)' is gone: its instance ended while it was resized")
        }
        return g
    }

    /// Whether two slices agree on everything a resize changes.
    static func same(_ a: ResourceSlice, _ b: ResourceSlice) -> Bool {
        a.cpus == b.cpus && a.memory == b.memory && a.cpuWeight == b.cpuWeight && a.cpuQuota == b.cpuQuota && a.cpuSet == b.cpuSet
    }
}
