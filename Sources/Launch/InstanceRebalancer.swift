/// Moves memory between running VMs with balloons: an idle guest gives back what it does not
/// use (beyond a headroom), a busy one gets memory back up to its launch size, each change
/// through the allocator like `mvm update`. Shrinks go first, so what they free can be granted
/// to the growths.
///
/// ```swift
/// let moves = await InstanceRebalancer(updater: InstanceUpdater(allocator: a)).run(instances)
/// ```
import Allocator
import MicroVMCore

/// How much a guest should have for what it uses.
public struct RebalancePolicy: Sendable, Equatable {
    /// Above what the guest uses (0.25: a quarter more).
    public var headroom: Double
    /// No guest goes below this.
    public var floor: ByteCount
    /// Changes smaller than this are left alone (each resize costs the guest a balloon round).
    public var step: ByteCount

    public init(headroom: Double = 0.25, floor: ByteCount = .mebibytes(128), step: ByteCount = .mebibytes(32)) {
        self.headroom = headroom; self.floor = floor; self.step = step
    }

    /// The memory a guest of this use should have, or nil to leave it as it is: its use plus the
    /// headroom, in whole MiB, at least the floor and at most its launch size.
    public func target(_ u: GuestMemoryUse) -> ByteCount? {
        guard let used = u.used, headroom.isFinite, headroom >= 0 else { return nil }
        let mib: UInt64 = 1 << 20
        var want = (UInt64((Double(used.bytes) * (1 + headroom)).rounded(.up)) + mib - 1) / mib * mib
        want = min(max(want, floor.bytes), u.boot.bytes)
        let delta = want > u.current.bytes ? want - u.current.bytes : u.current.bytes - want
        return delta >= step.bytes ? ByteCount(want) : nil
    }
}

public struct InstanceRebalancer: Sendable {
    public let updater: InstanceUpdater
    public let policy: RebalancePolicy
    public init(updater: InstanceUpdater, policy: RebalancePolicy = RebalancePolicy()) { self.updater = updater; self.policy = policy }

    /// One instance's move, planned or made.
    public struct Move: Sendable, Codable, Equatable {
        public var name: String
        public var mode: RunMode
        public var use: GuestMemoryUse
        /// The memory it should have; nil when it stays as it is.
        public var target: ByteCount?
        /// "resized", "planned", "left", or why it could not be moved.
        public var outcome: String
    }

    /// Plans (with `apply: false`) or makes every move, shrinks first. An instance whose use
    /// cannot be read, or whose resize is refused, is reported and left as it was.
    public func run(_ instances: [(info: InstanceInfo, backend: any InstanceBackend)], apply: Bool = true) async -> [Move] {
        var moves: [(Move, any InstanceBackend)] = []
        for (info, backend) in instances where info.mode.isVM {
            do {
                guard let use = try await backend.memoryUse(name: info.name) else { continue }
                let target = policy.target(use)
                moves.append((Move(name: info.name, mode: info.mode, use: use, target: target,
                                   outcome: target == nil ? (use.used == nil ? "left: the guest has not reported its use yet" : "left") : "planned"), backend))
            } catch {
                moves.append((Move(name: info.name, mode: info.mode, use: GuestMemoryUse(boot: info.memory, current: info.memory, used: nil),
                                   target: nil, outcome: "left: \(error)"), backend))
            }
        }
        // Shrinks before growths; the largest changes first within each.
        moves.sort { a, b in
            let da = Int64(bitPattern: (a.0.target ?? a.0.use.current).bytes) - Int64(bitPattern: a.0.use.current.bytes)
            let db = Int64(bitPattern: (b.0.target ?? b.0.use.current).bytes) - Int64(bitPattern: b.0.use.current.bytes)
            return (da < 0) != (db < 0) ? da < 0 : abs(da) > abs(db)
        }
        guard apply else { return moves.map(\.0) }
        var out: [Move] = []
        for (var move, backend) in moves {
            if let target = move.target {
                do {
                    try await updater.update(name: move.name, Allocator.Resize(memory: target), on: backend)
                    move.outcome = "resized"
                } catch {
                    move.outcome = "refused: \(error)"
                }
            }
            out.append(move)
        }
        return out
    }
}
