import Foundation
import Testing
import MicroVMCore
import Images
import Launch
@testable import Bench

@Suite struct QEMUMicrovmTests {
    let image = try! JSONDecoder().decode(GuestImage.self, from: Data("""
        {"key": "k", "directory": "/cache/img,1", "kernelVersion": "6.1", "hasPVHNote": true, "modules": []}
        """.utf8))

    @Test func commandLineMirrorsTheDirectVMMsGuest() throws {
        let q = QEMUMicrovmBackend(image: image, accelerator: .kvm)
        var spec = VMSpec(name: "ref-1", cpus: 2, memory: .mebibytes(128), command: ["echo", "hi"])
        spec.disks = [DiskSpec(path: "/tmp/scratch.img", direct: true)]
        let a = q.arguments(for: try InstanceLauncher().plan(spec, slice: ResourceSlice(cpus: 2, memory: .mebibytes(128)), backend: q))
        func value(after flag: String) -> String? { a.firstIndex(of: flag).map { a[$0 + 1] } }
        #expect(value(after: "-name") == "ref-1")
        #expect(value(after: "-M")?.hasPrefix("microvm,acpi=on") == true)
        #expect(value(after: "-accel") == "kvm")
        #expect(value(after: "-cpu") == "host")
        #expect(value(after: "-m") == "128M" && value(after: "-smp") == "2")
        #expect(value(after: "-kernel") == "/cache/img,1/vmlinuz")
        let append = value(after: "-append") ?? ""
        #expect(append.contains("mvm.cmd=\(GuestProtocol.encodeCommand(["echo", "hi"]))") && append.contains("mvm.ro=1"))
        // The rootfs first (read-only), then the spec's disks; commas in paths doubled for QEMU.
        let drives = a.indices.filter { a[$0] == "-drive" }.map { a[$0 + 1] }
        #expect(drives == ["id=root,file=/cache/img,,1/rootfs.ext4,format=raw,if=none,readonly=on",
                           "id=disk0,file=/tmp/scratch.img,format=raw,if=none,readonly=off,cache=none"])
        #expect(a.filter { $0.hasPrefix("virtio-blk-device") }.count == 2)
        #expect(a.contains("virtio-rng-device,rng=rng0"))
        #expect(!a.contains("-enable-kvm") && !a.contains("pc"))
    }

    @Test func tcgNeverAsksForTheHostCPU() throws {
        let q = QEMUMicrovmBackend(image: image, accelerator: .tcg)
        let a = q.arguments(for: try InstanceLauncher().plan(VMSpec(name: "t"), slice: ResourceSlice(cpus: 1, memory: .mebibytes(128)), backend: q))
        #expect(a.firstIndex(of: "-accel").map { a[$0 + 1] } == "tcg")
        #expect(a.firstIndex(of: "-cpu").map { a[$0 + 1] } == "max")
    }

    @Test func catalogKnowsTheReferenceButDoesNotRunItByDefault() {
        #expect(BackendCatalog.knownNames.contains("qemu-microvm"))
        #expect(!BackendCatalog.defaultNames.contains("qemu-microvm"))
        #expect(BackendCatalog.mode(of: "qemu-microvm") == .hosted)
    }

    @Test func diskScriptOnlyTouchesGuestDisksForVMs() {
        for target in [DiskIO.Target.temporaryFile, .scratchDirectory] {
            let host = DiskIO.script(seconds: 1, size: .mebibytes(8), target: target)
            #expect(!host.contains("/dev/vd"), "a host's own /dev/vd* must never be a fio target")
        }
        #expect(DiskIO.script(seconds: 1, size: .mebibytes(8), target: .scratchDirectory).contains("f=/mnt/mvm-bench.fio"))
        let vm = DiskIO.script(seconds: 1, size: .mebibytes(8), target: .scratchDisk)
        #expect(vm.contains("/proc/mounts") && vm.contains("/dev/vdb"))
    }
}
