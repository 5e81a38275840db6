import Foundation
import MicroVM

/// Builds the backend for a mode, the one place `mvm` maps modes to implementations.
enum Backends {
    static func make(mode: RunMode, connect: String?, runtime: String?, attachRootfs: Bool = true, jail: Bool = true) throws -> any InstanceBackend {
        switch mode {
        case .container:
            return ContainerBackend(runtime: ContainerRuntime(parsing: runtime ?? "runc"),
                                    defaultRootfs: { try ImageStore().ensureDefault().rootfsTree })
        case .native:
            return NativeBackend()
        case .direct:
            // The VM runs in an mvm-vmm process of its own, which joins the instance's cgroup.
            var options = DirectBackend.Options(attachRootfs: attachRootfs)
            options.jail = options.jail && jail
            return DirectBackend(options: options)
        case .hosted:
            return HostedBackend(connect: connect, attachRootfs: attachRootfs)
        }
    }

    /// Every backend that can list, stop and show logs of instances (for ps/stop/logs).
    static func all(connect: String?) -> [any InstanceBackend] {
        // One OCI container backend lists every bundle, whatever OCI runtime (runc, crun, runsc)
        // each was started with; Docker's containers are Docker's to list (docker ps).
        [DirectBackend(), HostedBackend(connect: connect), ContainerBackend(runtime: .runc)]
    }
}
