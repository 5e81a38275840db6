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
            return DirectBackend(options: .init(attachRootfs: attachRootfs))
        case .hosted:
            return HostedBackend(connect: connect, attachRootfs: attachRootfs)
        }
    }

    /// Every backend that can list, stop and show logs of instances (for ps/stop/logs).
    static func all(connect: String?) -> [any InstanceBackend] {
        [DirectBackend(), HostedBackend(connect: connect), ContainerBackend(runtime: .runc)]
    }
}

/// Grants a slice from the allocator for the life of a run, and enforces it where the backend
/// itself cannot: the direct VMM runs in this process, so this process joins the slice's cgroup
/// (its vCPU threads are pinned by the VMM from `spec.slice.cpuSet`). Hosted guests get the slice
/// as libvirt `<cputune>`/`<memtune>`, containers as OCI `linux.resources`.
enum Grants {
    static func withGrant<T: Sendable>(slice: ResourceSlice, owner: String, mode: RunMode, config: MicroVMConfig,
                                       _ body: (ResourceSlice) async throws -> T) async throws -> T {
        let allocator = try Allocator.open(config: config)
        let request = SliceRequest(cpus: slice.cpus, placement: slice.placement, weight: slice.cpuWeight, quota: slice.cpuQuota,
                                   memory: slice.memory, hugePages: slice.hugePages, pidsLimit: slice.pidsLimit,
                                   owner: owner, ownerPID: getpid(), mode: mode.rawValue)
        let grant = try allocator.allocate(request)
        var cgroup: CgroupSet?
        do {
            if mode == .direct {
                // The VMM's own memory is on top of the guest's: leave it room in the limit.
                var vmmSlice = grant.slice
                vmmSlice.memory = vmmSlice.memory + .mebibytes(64)
                let cg = try CgroupSet.create(name: "microvm/direct-\(owner)", slice: vmmSlice)
                cgroup = cg
                try cg.add(pid: getpid())
            }
            let result = try await body(grant.slice)
            try? cgroup?.remove()
            _ = try? allocator.release(grant.id)
            return result
        } catch {
            try? cgroup?.remove()
            _ = try? allocator.release(grant.id)
            throw error
        }
    }
}
