import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// CLOCK_MONOTONIC in seconds: the one clock for deadlines and durations (never wall time,
/// which NTP may step).
public enum Monotonic {
    public static func seconds() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}

/// One environment variable, read with getenv(3): ProcessInfo copies the whole environment into a
/// dictionary on first use, which a VMM's start has no use for.
public func environmentVariable(_ name: String) -> String? { getenv(name).map { String(cString: $0) } }

/// Whether this process runs inside the nested test rig (`mvm rig run` sets `MVM_IN_RIG=1` for
/// its command). There `/dev/kvm` is Linux's own KVM, but on a CPU that QEMU TCG emulates one
/// level down: real KVM code paths at emulation speed, so never labelled a hardware figure.
public enum RigEnvironment {
    public static let variable = "MVM_IN_RIG"
    public static var isInside: Bool { environmentVariable(variable) == "1" }
    /// How VM numbers taken inside the rig are labelled, everywhere.
    public static let kvmLabel = "nested KVM (rig, TCG below)"
}

extension RunMode {
    /// Hosted and direct instances are virtual machines (they boot a guest kernel).
    public var isVM: Bool { self == .hosted || self == .direct }
}
