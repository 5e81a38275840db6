import Foundation
import MicroVMCore
import VMMAPI

/// A VM's memory moved through its balloon, over its control API (`mvm-vmm`'s, or the one a
/// hosted run serves for its domain): the same steps and the same error for both modes.
public enum BalloonResize {
    /// How long a guest has to fill its balloon (seconds; `MVM_BALLOON_WAIT` overrides 30).
    public static var grace: Double {
        ProcessInfo.processInfo.environment["MVM_BALLOON_WAIT"].flatMap(Double.init).map { max(0.1, $0) } ?? 30
    }

    /// A VM's memory use from its `GET /balloon/statistics` answer.
    public static func use(boot: ByteCount, statistics body: String) throws -> GuestMemoryUse {
        let s: BalloonStatistics
        do { s = try JSONDecoder().decode(BalloonStatistics.self, from: Data(body.utf8)) }
        catch { throw MicroVMError(.backend, "the balloon's statistics are not what the API serves: \(body.prefix(200))", cause: error) }
        return GuestMemoryUse(boot: boot, balloonPages: s.actualPages, guestTotal: s.guest["total_memory"], guestAvailable: s.guest["available_memory"])
    }

    /// Whether `instance` (e.g. "direct instance 'web'"), which booted with `boot` (nil: it has no
    /// balloon), can go from `from` to `to` of memory: up to its boot size, in whole MiB, at least
    /// `minimum`.
    public static func check(_ instance: String, boot: ByteCount?, from: ByteCount, to: ByteCount, minimum: ByteCount) throws {
        guard let boot else {
            throw MicroVMError.unsupported("\(instance) has no balloon, so its memory (\(from)) is fixed: start it with --balloon to resize it live")
        }
        guard to <= boot else {
            throw MicroVMError.invalidArgument("\(instance) booted with \(boot): its balloon can give it at most that (asked for \(to))")
        }
        guard to.bytes % (1 << 20) == 0, to >= minimum else {
            throw MicroVMError.invalidArgument("\(instance)'s memory moves in whole MiB and stays at least \(minimum) (asked for \(to))")
        }
    }

    /// Moves the memory of `name` (which booted with `boot`) from `from` to `to`: a smaller
    /// guest must fill its balloon within `grace` seconds, or the balloon goes back and nothing
    /// changes. Blocks: call it off the cooperative pool (`offload`).
    public static func run(_ name: String, api: APIClient, boot: ByteCount, from: ByteCount, to: ByteCount) throws {
        let outcome: APIClient.BalloonOutcome
        do {
            outcome = try api.resizeBalloon(to: Int((boot - to).bytes >> 20), from: Int((boot - from).bytes >> 20), waitingUpTo: grace)
        } catch {
            throw MicroVMError(.backend, "instance '\(name)': its balloon could not be resized: \(error)")
        }
        if case .notFilled(let held, let wanted) = outcome {
            throw MicroVMError(.timeout, "instance '\(name)' put only \(ByteCount(UInt64(held) * 4096)) of the asked \(ByteCount(UInt64(wanted) * 4096)) in its balloon within \(Int(grace)) s (its memory is in use, or its kernel has no virtio_balloon driver): nothing was changed")
        }
    }
}
