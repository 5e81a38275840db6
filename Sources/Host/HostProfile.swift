/// Host: what this machine can run, probed once and cached per boot — KVM (by a functional
/// probe, not by name), QEMU and its accelerators, libvirt, the OCI runtimes against this host's
/// cgroup layout, libguestfs, memory and CPUs. Every module asks `HostProfile`, never guesses.
///
/// ```swift
/// let host = HostProfile.current()
/// if host.kvm.verdict == .hardware { /* boot Linux under our VMM directly */ }
/// ```
import Foundation
import MicroVMCore
import KVM

/// How the host mounts cgroups.
public enum CgroupMode: String, Codable, Sendable {
    /// Only the v1 controller hierarchies.
    case v1
    /// v1 controllers plus a (usually empty) unified v2 mount.
    case hybrid
    /// Only the unified v2 hierarchy.
    case v2
    /// No cgroup filesystem at all.
    case none
}

/// One probed capability: whether it works, what was found, and the fix when it does not.
public struct Capability: Codable, Sendable, Equatable {
    public var usable: Bool
    public var detail: String
    public var fix: String?
    public init(usable: Bool, detail: String, fix: String? = nil) { self.usable = usable; self.detail = detail; self.fix = fix }
}

/// Everything `mvm doctor` reports. Codable so it can be cached and printed as JSON.
public struct HostProfile: Codable, Sendable {
    public var bootID: String
    public var kernel: String
    public var cpuModel: String
    public var onlineCPUs: [Int]
    public var memoryTotal: ByteCount
    public var memoryAvailable: ByteCount
    public var kvm: KVMProbeResult
    public var cgroupMode: CgroupMode
    public var capabilities: [String: Capability]

    public func capability(_ name: String) -> Capability {
        capabilities[name] ?? Capability(usable: false, detail: "not probed")
    }

    /// Labels numbers honestly: what acceleration a VM run here really gets.
    /// Inside the nested rig a hardware verdict is the rig's own KVM, running on an emulated CPU.
    public var vmAcceleration: String {
        guard kvm.verdict == .hardware else { return "TCG (emulation)" }
        return RigEnvironment.isInside ? RigEnvironment.kvmLabel + ": not a hardware figure" : "hardware KVM"
    }
}

/// Where probes read the host from. Tests point it at fake /proc and /sys trees.
public struct HostRoots: Sendable {
    public var proc: String
    public var sys: String
    public init(proc: String = "/proc", sys: String = "/sys") { self.proc = proc; self.sys = sys }
}
