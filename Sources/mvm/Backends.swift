import Foundation
import MicroVM

/// Builds the backend for a mode, the one place `mvm` maps modes to implementations.
enum Backends {
    static func make(mode: RunMode, connect: String?, runtime: String?, attachRootfs: Bool = true) throws -> any InstanceBackend {
        switch mode {
        case .container:
            return ContainerBackend(runtime: ContainerRuntime(parsing: runtime ?? "runc"),
                                    defaultRootfs: { try ImageStore().ensureDefault().rootfsTree })
        case .native:
            return NativeBackend()
        case .direct:
            return DirectBackend()
        case .hosted:
            return HostedBackend(connect: connect, attachRootfs: attachRootfs)
        }
    }

    /// Every backend that can list, stop and show logs of instances (for ps/stop/logs).
    static func all(connect: String?) -> [any InstanceBackend] {
        [DirectBackend(), HostedBackend(connect: connect), ContainerBackend(runtime: .runc)]
    }
}

/// Grants a slice from the allocator for the life of a run.
enum Grants {
    static func withGrant<T: Sendable>(slice: ResourceSlice, owner: String, config: MicroVMConfig,
                                       _ body: (ResourceSlice) async throws -> T) async throws -> T {
        try await body(slice)
    }
}
