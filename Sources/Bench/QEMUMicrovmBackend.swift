import Foundation
import MicroVMCore
import Images
import Allocator
import Launch
#if canImport(Glibc)
import Glibc
#endif

/// QEMU's own minimal machine (`-M microvm`), started directly rather than through libvirt: the
/// reference the direct VMM is measured against. Same kernel, initramfs, command line, read-only
/// rootfs disk and entropy device as the direct VMM gives its guest, on virtio-mmio transports
/// that the guest finds through QEMU's ACPI tables, the console on a pipe that the guest
/// protocol is parsed from as it arrives (boot-complete, then the framed result).
///
/// ```swift
/// let qemu = QEMUMicrovmBackend(image: image, accelerator: .kvm)
/// let r = try await qemu.run(VMSpec(name: "ref", command: ["true"]))
/// print(r.bootSeconds ?? 0)
/// ```
public final class QEMUMicrovmBackend: InstanceBackend, @unchecked Sendable {
    public enum Accelerator: String, Sendable { case kvm, tcg }

    public let mode = RunMode.hosted
    public let image: GuestImage
    public let accelerator: Accelerator
    public let qemu: String

    public init(image: GuestImage, accelerator: Accelerator, qemu: String = "qemu-system-x86_64") {
        self.image = image; self.accelerator = accelerator; self.qemu = qemu
    }

    public func defaultArtifacts() throws -> BootArtifacts? { image.artifacts }

    /// The QEMU command line for a plan (without the CPU pinning prefix); `link` is the tap the
    /// guest's virtio-net attaches to, userspace virtio-net (no vhost) as in the direct VMM.
    public func arguments(for plan: LaunchPlan, link: TapLink? = nil) -> [String] {
        let spec = plan.spec
        let cmdline = plan.cmdline
        var argv = [qemu, "-name", spec.name, "-M", "microvm,acpi=on,pic=off,pit=on,rtc=on,isa-serial=on",
                    "-accel", accelerator.rawValue, "-cpu", accelerator == .kvm ? "host" : "max",
                    "-m", "\(max(16, spec.memory.mebibytes))M", "-smp", "\(spec.cpus)",
                    "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
                    "-kernel", plan.kernel ?? ""] + (plan.initrd.map { ["-initrd", $0] } ?? []) + ["-append", cmdline]
        for (i, d) in plan.disks.enumerated() {
            let id = plan.rootfsAttached ? (i == 0 ? "root" : "disk\(i - 1)") : "disk\(i)"
            argv += Self.blockDevice(id: id, d)
        }
        if let link { argv += Self.netDevice(tap: link.tap.name, mac: HostLinks.mac(seed: spec.name)) }
        argv += ["-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-device,rng=rng0"]
        return argv
    }

    /// A raw disk on virtio-blk over virtio-mmio.
    static func blockDevice(id: String, _ d: DiskSpec) -> [String] {
        ["-drive", "id=\(id),file=\(escape(d.path)),format=raw,if=none,readonly=\(d.readOnly ? "on" : "off")" + (d.direct ? ",cache=none" : ""),
         "-device", "virtio-blk-device,drive=\(id)"]
    }

    /// An existing tap, opened by name, on userspace virtio-net (no vhost, as in the direct VMM).
    static func netDevice(tap: String, mac: [UInt8]? = nil) -> [String] {
        ["-netdev", "tap,id=net0,ifname=\(escape(tap)),script=no,downscript=no,vnet_hdr=on,vhost=off",
         "-device", "virtio-net-device,netdev=net0" + (mac.map { ",mac=" + HostLinks.format(mac: $0) } ?? "")]
    }

    /// QEMU option values separate on commas; a literal comma is written twice.
    static func escape(_ s: String) -> String { s.replacingOccurrences(of: ",", with: ",,") }

    public func execute(_ plan: LaunchPlan) async throws -> RunResult {
        let spec = plan.spec
        guard plan.kernel != nil else { throw MicroVMError(.internalError, "a QEMU microvm launch plan has no kernel") }
        guard spec.vsockCID == nil else {
            throw MicroVMError.unsupported("the QEMU microvm reference runs without vsock")
        }
        // QEMU opens the tap by name: it persists once made here and is removed after the run.
        let link = try spec.net.map { try TapLink.open($0, owner: spec.name, persistent: true) }
        link?.tap.close()
        defer { link?.tap.remove() }
        var argv = arguments(for: plan, link: link)
        if !plan.enforcement.cpuSet.isEmpty { argv = ["taskset", "-c", CPUList.format(plan.enforcement.cpuSet)] + argv }
        // The same enforcement as the direct VMM's: QEMU joins a cgroup of the plan's slice.
        let cgroup = getuid() == 0 ? try CgroupSet.create(name: "microvm/qemu-\(spec.name)", slice: plan.enforcement.cgroupSlice) : nil
        defer { try? cgroup?.remove() }
        let pipe = try ProcessRunner.makePipe()
        let child: ChildProcess
        do {
            child = try ChildProcess(argv, stdout: .descriptor(pipe.write), stderr: .descriptor(pipe.write), package: "qemu-system-x86")
        } catch {
            close(pipe.read); close(pipe.write)
            throw error
        }
        close(pipe.write)
        try? cgroup?.add(pid: child.pid)
        plan.clock.mark(.spawned)
        plan.clock.mark(.firstInstruction)
        let clock = plan.clock
        let timeout = spec.timeout
        let (parser, console, status, timedOut) = await withCheckedContinuation { cont in
            Thread.detachNewThread {
                var parser = ConsoleParser()
                var console = Data()
                var booted = false
                var buf = [UInt8](repeating: 0, count: 65536)
                let deadline = Monotonic.seconds() + timeout
                var killed = false
                while true {
                    var pfd = pollfd(fd: pipe.read, events: Int16(POLLIN), revents: 0)
                    let r = poll(&pfd, 1, 200)
                    if r > 0 {
                        let n = buf.withUnsafeMutableBytes { read(pipe.read, $0.baseAddress, $0.count) }
                        if n <= 0 { break }
                        let chunk = buf[0..<n]
                        if console.count < 16 << 20 { console.append(contentsOf: chunk) }
                        _ = parser.feed(chunk)
                        if !booted, parser.bootComplete { booted = true; clock.mark(.ready) }
                    }
                    if parser.report != nil {
                        // The result is in: the guest powers off next; give it a moment, then stop it.
                        if child.wait(upTo: 10) == nil { child.signal(SIGKILL) }
                        break
                    }
                    if Monotonic.seconds() > deadline { killed = true; child.signal(SIGKILL); break }
                }
                close(pipe.read)
                let status = child.wait(timeout: 10).status
                cont.resume(returning: (parser, console, status, killed))
            }
        }
        let text = String(decoding: console, as: UTF8.self)
        guard let report = parser.report else {
            let tail = text.split(separator: "\n", omittingEmptySubsequences: false).suffix(15).joined(separator: "\n")
            if timedOut {
                throw MicroVMError(.timeout, "QEMU microvm '\(spec.name)' did not report a result within \(Int(timeout)) s; console tail:\n\(tail)")
            }
            throw MicroVMError(.guestError, "QEMU microvm '\(spec.name)' exited (status \(status)) before the guest reported a result; console tail:\n\(tail)")
        }
        return plan.result(status: report.status, output: report.outputText, console: text)
    }
}
