import Foundation
import Host
import Images
import MicroVMCore
import Testing
import Launch
@testable import DirectVMM
@testable import VMM

let hostKVM = HostProfile.current().kvm.verdict
let kvmIsHardware = hostKVM == .hardware
let kvmIsEmulated = hostKVM == .emulated

func tempPaths() throws -> Paths {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mvm-direct-\(UUID().uuidString.prefix(8))").path
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return Paths(state: dir, cache: Paths.default.cache)
}

@Suite("Direct backend", .serialized, .timeLimit(.minutes(5)))
struct DirectBackendTests {
    @Test(.enabled(if: kvmIsEmulated, "host KVM is not emulated here: nothing to refuse"))
    func refusesEmulatedKVMAndNamesTheRig() async throws {
        let paths = try tempPaths()
        defer { try? FileManager.default.removeItem(atPath: paths.state) }
        let backend = DirectBackend(options: .init(allowEmulatedKVM: false, paths: paths))
        await #expect {
            _ = try await backend.run(VMSpec(command: ["true"]))
        } throws: { e in
            "\(e)".contains("mvm rig run") && (e as? MicroVMError)?.code == .unsupported
        }
    }

    @Test func kernelCommandLineCarriesTheCommandAndOurParameters() throws {
        let paths = try tempPaths()
        defer { try? FileManager.default.removeItem(atPath: paths.state) }
        let backend = DirectBackend(options: .init(paths: paths, attachRootfs: false))
        let plan = try InstanceLauncher().plan(VMSpec(kernel: "/boot/vmlinuz", cmdline: "mvm.debug=1", command: ["echo", "a b"]),
                                               slice: ResourceSlice(cpus: 1, memory: .mebibytes(128)), backend: backend)
        #expect(plan.kernel == "/boot/vmlinuz" && plan.initrd == nil && plan.disks.isEmpty)
        #expect(plan.cmdline.contains("console=ttyS0") && plan.cmdline.contains("loglevel=3") && plan.cmdline.contains("reboot=k") && plan.cmdline.contains("i8042.noaux"))
        #expect(plan.cmdline.contains("mvm.cmd=\(GuestProtocol.encodeCommand(["echo", "a b"]))"))
        #expect(plan.cmdline.hasSuffix("mvm.debug=1"))
        #expect(plan.enforcement.cpuQuota == 1)
    }

    /// The whole product path (image, loader, devices, vCPU threads, console parsing) under a
    /// KVM that cannot run Linux: it must end with a clear error, not hang or crash.
    @Test(.enabled(if: kvmIsEmulated, "host KVM is not emulated: the hardware suite covers the real boot"))
    func emulatedKVMOptInEndsWithAClearError() async throws {
        let paths = try tempPaths()
        defer { try? FileManager.default.removeItem(atPath: paths.state) }
        let image = try ImageStore(paths: paths).ensureDefault()
        let backend = DirectBackend(options: .init(allowEmulatedKVM: true, paths: paths))
        let start = Date()
        do {
            let r = try await backend.run(VMSpec(kernel: image.vmlinux, initrd: image.initrd, memory: .mebibytes(256), command: ["true"], timeout: 10))
            Issue.record("Linux unexpectedly booted under an emulated KVM: status \(r.exitStatus)")
        } catch let e as MicroVMError {
            print("vmlinux under emulated KVM: \(e.message.prefix(300))")
            #expect(e.code == .guestError || e.code == .timeout)
            #expect(e.message.contains("without reporting a result"))
        }
        #expect(Date().timeIntervalSince(start) < 120)
        await #expect(throws: MicroVMError.self) { _ = try await backend.logs(name: "missing-instance") }
    }
}

/// Layer 3: a real Linux boot. Needs hardware KVM (here: inside the nested rig).
@Suite("Direct backend boots Linux", .serialized, .enabled(if: kvmIsHardware, "host KVM is \(hostKVM.rawValue): runs in the nested rig (mvm rig run)"), .timeLimit(.minutes(10)))
struct DirectLinuxBootTests {
    @Test(arguments: [(1, false), (2, false), (1, true), (2, true)])
    func bootsAndReportsTheCommand(cpus: Int, vmlinux: Bool) async throws {
        let paths = try tempPaths()
        defer { try? FileManager.default.removeItem(atPath: paths.state) }
        let image = try ImageStore(paths: paths).ensureDefault()
        let backend = DirectBackend(options: .init(paths: paths))
        let spec = VMSpec(kernel: vmlinux ? image.vmlinux : image.kernel, initrd: image.initrd, cpus: cpus, memory: .mebibytes(512),
                          command: ["sh", "-c", "echo hello from $(grep -c ^processor /proc/cpuinfo) cpus; exit 3"], timeout: 240)
        let r = try await backend.run(spec)
        #expect(r.exitStatus == 3)
        #expect(r.output == "hello from \(cpus) cpus\n")
        #expect(r.bootSeconds != nil)
        #expect(try await backend.logs(name: spec.name).contains("@@mvm:end"))
    }
}
