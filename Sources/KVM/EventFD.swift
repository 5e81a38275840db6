import CLinux
import MicroVMCore
#if canImport(Glibc)
import Glibc
#endif

/// A Linux eventfd: a counter KVM can signal (irqfd) or that KVM signals (ioeventfd), so an
/// interrupt or a queue notification skips the trip through the VMM's vCPU loop.
public final class EventFD: Sendable {
    let fd: OwnedFD

    /// - Parameter nonBlocking: reads return nil instead of waiting when the counter is zero.
    public init(nonBlocking: Bool = false) throws {
        let raw = clinux_eventfd(0, O_CLOEXEC | (nonBlocking ? O_NONBLOCK : 0))
        guard raw >= 0 else { throw MicroVMError(.insufficientResources, "cannot create an eventfd", cause: SystemCallError("eventfd", errno: errno)) }
        fd = OwnedFD(raw)
    }

    /// Adds `value` to the counter (wakes a reader, or makes KVM inject the irqfd's interrupt).
    public func signal(_ value: UInt64 = 1) {
        var v = value
        _ = Glibc.write(fd.raw, &v, 8)
    }

    /// Reads and resets the counter; nil when non-blocking and zero.
    public func consume() -> UInt64? {
        var v: UInt64 = 0
        return Glibc.read(fd.raw, &v, 8) == 8 ? v : nil
    }

    /// For poll(2) loops.
    public var pollDescriptor: Int32 { fd.raw }
}
