import Foundation
import MicroVMCore
import Host
import KVM
import Images
import Containers
import Libvirt
import DirectVMM
import VMM

/// Which backends a bench run can use on this host, and why the others cannot run: a backend that
/// cannot run still appears in every table, as `unavailable: <reason>`.
public enum BackendCatalog {
    public static let knownNames = ["native", "runc", "runsc", "docker", "hosted", "direct", "qemu-microvm"]
    /// What `mvm bench` runs unless told otherwise; `qemu-microvm` (QEMU's minimal machine run
    /// directly, the direct VMM's reference) is asked for by name.
    public static let defaultNames = ["native", "runc", "runsc", "docker", "hosted", "direct"]

    public static func mode(of name: String) -> RunMode {
        switch name {
        case "native": return .native
        case "hosted", "qemu-microvm": return .hosted
        case "direct": return .direct
        default: return .container
        }
    }

    /// The VM mode mvm-runtime runs containers in: the direct VMM where KVM is hardware (or
    /// nested), hosted QEMU otherwise.
    public static func runtimeVMMode(kvm: KVMProbeResult.Verdict) -> RunMode { kvm == .hardware ? .direct : .hosted }

    /// The label of KVM inside the nested rig (`RigEnvironment.kvmLabel`).
    public static let nestedKVM = RigEnvironment.kvmLabel

    /// Labels under which a VM runs on a real KVM implementation (the full scenario set).
    public static let realKVM: Set<String> = ["hardware KVM", nestedKVM]

    /// What acceleration numbers from this mode really measure on this host. Never claims KVM for
    /// emulation: the hosted backend falls back to TCG wherever KVM is not hardware, and inside
    /// the rig (`MVM_IN_RIG=1`) a hardware verdict is the nested KVM's.
    public static func acceleration(mode: RunMode, kvm: KVMProbeResult.Verdict,
                                    inRig: Bool = RigEnvironment.isInside) -> String {
        let kvmLabel = inRig ? nestedKVM : "hardware KVM"
        switch mode {
        case .native, .container: return "none"
        case .hosted: return kvm == .hardware ? kvmLabel : "TCG"
        case .direct:
            switch kvm {
            case .hardware: return kvmLabel
            case .emulated: return "emulated KVM"
            case .absent: return "none"
            }
        }
    }

    /// Why a backend cannot run here (nil: it can).
    public static func unavailableReason(_ name: String, host: HostProfile) -> String? {
        switch name {
        case "native": return nil
        case "direct":
            switch host.kvm.verdict {
            case .hardware: return nil
            case .emulated: return "host KVM is emulated (\(host.kvm.reason)); run inside `mvm rig run`"
            case .absent: return "no usable /dev/kvm (\(host.kvm.reason))"
            }
        case "hosted":
            let c = host.capability("libvirt-embed")
            return c.usable ? nil : "\(c.detail)\(c.fix.map { "; fix: \($0)" } ?? "")"
        case "qemu-microvm":
            let c = host.capability("qemu")
            return c.usable ? nil : "\(c.detail)\(c.fix.map { "; fix: \($0)" } ?? "")"
        case "runc", "runsc", "docker":
            let c = host.capability(name)
            guard c.usable else { return "\(c.detail)\(c.fix.map { "; fix: \($0)" } ?? "")" }
            // The host profile is cached: whether dockerd answers is asked now, or every docker
            // cell of the run would fail one by one.
            if name == "docker", (try? ProcessRunner.run(["docker", "version", "--format", "{{.Server.Version}}"], timeout: 15))?.status != 0 {
                return "the Docker engine is not running: start it with 'dockerd --iptables=false --bridge=none &'"
            }
            return nil
        default:
            return "unknown backend '\(name)': choose from \(knownNames.joined(separator: ", "))"
        }
    }

    public static func versions(_ name: String, host: HostProfile) -> [String: String] {
        var v = ["hostKernel": host.kernel]
        switch name {
        case "runc", "runsc", "docker": v[name] = host.capability(name).detail
        case "hosted":
            v["qemu"] = host.capability("qemu").detail
            v["libvirt"] = host.capability("libvirt-embed").detail
        case "qemu-microvm":
            v["qemu"] = host.capability("qemu").detail
            v["machine"] = "microvm (no libvirt)"
        case "direct": v["kvm"] = "\(host.kvm.verdict.rawValue): \(host.kvm.reason)"
        default: break
        }
        return v
    }

    /// Builds the targets for the given names. `factories` supplies the real backends by name
    /// (native is built in); a name without a factory is listed as unavailable with the reason.
    public static func targets(_ names: [String], host: HostProfile, factories: [String: @Sendable () throws -> any InstanceBackend],
                               networks: [String: NetworkPath] = ["native": .hostLoopback, "runc": .perInstanceLink, "direct": .perInstanceLink,
                                                                  "hosted": .perInstanceLink, "qemu-microvm": .perInstanceLink,
                                                                  "docker": .backendNetwork(host: ContainerBackend.dockerNetworkHost),
                                                                  "runsc": .unavailable("runsc runs without a network here: gVisor's netstack does not take mvm's veth namespace")]) -> [BenchTarget] {
        names.map { name in
            let mode = mode(of: name)
            var record = BackendRecord(name: name, mode: mode, acceleration: acceleration(mode: mode, kvm: host.kvm.verdict),
                                       available: false, versions: versions(name, host: host))
            if let why = unavailableReason(name, host: host) {
                record.unavailableReason = why
                return BenchTarget(record: record, backend: nil)
            }
            let backend: any InstanceBackend
            do {
                if name == "native" { backend = NativeBackend() }
                else if let make = factories[name] { backend = try make() }
                else {
                    record.unavailableReason = "this mvm was built without the \(name) backend"
                    return BenchTarget(record: record, backend: nil)
                }
            } catch {
                record.unavailableReason = "cannot set up the \(name) backend: \(error)"
                return BenchTarget(record: record, backend: nil)
            }
            record.available = true
            return BenchTarget(record: record, backend: backend,
                               network: networks[name] ?? .unavailable("bench runs on the \(name) backend have no network path to the host yet"))
        }
    }
}

extension Workload {
    /// The default guest image: VMs boot it, containers and native runs use its rootfs tree.
    public init(image: GuestImage) {
        self.init(kernel: image.kernel, initrd: image.initrd, rootfsDisk: image.rootfsDisk, rootfsTree: image.rootfsTree,
                  kernelVersion: image.kernelVersion, source: "guest image \(image.key) (rootfs \(image.rootfsTree))")
    }
}

extension BackendCatalog {
    /// The project's real backends. Without an image (host binaries) only containers can share
    /// the workload, so the VM backends are left out and listed as unavailable. Docker imports
    /// the workload's tree (from the tarball beside it, where there is one: a guest image's).
    public static func standardFactories(image: GuestImage?, paths: Paths = .default) -> [String: @Sendable () throws -> any InstanceBackend] {
        var f: [String: @Sendable () throws -> any InstanceBackend] = [
            "runc": { ContainerBackend(runtime: .runc, paths: paths) },
            "runsc": { ContainerBackend(runtime: .runsc, paths: paths) },
            "docker": { ContainerBackend(runtime: .docker, paths: paths) },
        ]
        if let image {
            f["hosted"] = { HostedBackend(paths: paths, image: { image }) }
            f["direct"] = { DirectBackend(options: DirectBackend.Options(paths: paths, sharedHolder: true, keepsEndedLog: false)) }
            f["qemu-microvm"] = {
                QEMUMicrovmBackend(image: image, accelerator: HostProfile.current().kvm.verdict == .hardware ? .kvm : .tcg)
            }
        }
        return f
    }
}
