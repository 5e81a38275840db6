import Foundation
import MicroVMCore
import Images
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

    /// The QEMU command line for `spec` (without the CPU pinning prefix); `link` is the tap the
    /// guest's virtio-net attaches to, userspace virtio-net (no vhost) as in the direct VMM.
    public func arguments(for spec: VMSpec, link: TapLink? = nil) -> [String] {
        var resolved = spec
        resolved.net = link?.resolved
        let extra = (["mvm.ro=1"] + resolved.initParameters + [spec.cmdline]).filter { !$0.isEmpty }
        let cmdline = image.kernelCommandLine(command: spec.command, extra: extra.joined(separator: " "))
        var argv = [qemu, "-name", spec.name, "-M", "microvm,acpi=on,pic=off,pit=on,rtc=on,isa-serial=on",
                    "-accel", accelerator.rawValue, "-cpu", accelerator == .kvm ? "host" : "max",
                    "-m", "\(max(16, spec.memory.mebibytes))M", "-smp", "\(spec.cpus)",
                    "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
                    "-kernel", spec.kernel ?? image.kernel, "-initrd", spec.initrd ?? image.initrd, "-append", cmdline,
                    "-drive", "id=root,file=\(Self.escape(image.rootfsDisk)),format=raw,if=none,readonly=on",
                    "-device", "virtio-blk-device,drive=root"]
        for (i, d) in spec.disks.enumerated() {
            argv += ["-drive", "id=disk\(i),file=\(Self.escape(d.path)),format=raw,if=none,readonly=\(d.readOnly ? "on" : "off")"
                        + (d.direct ? ",cache=none" : ""),
                     "-device", "virtio-blk-device,drive=disk\(i)"]
        }
        if let link {
            argv += ["-netdev", "tap,id=net0,ifname=\(Self.escape(link.tap.name)),script=no,downscript=no,vnet_hdr=on,vhost=off",
                     "-device", "virtio-net-device,netdev=net0,mac=\(HostLinks.format(mac: HostLinks.mac(seed: spec.name)))"]
        }
        argv += ["-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-device,rng=rng0"]
        return argv
    }

    /// QEMU option values separate on commas; a literal comma is written twice.
    static func escape(_ s: String) -> String { s.replacingOccurrences(of: ",", with: ",,") }

    public func run(_ spec: VMSpec) async throws -> RunResult {
        try spec.validate()
        guard spec.vsockCID == nil else {
            throw MicroVMError.unsupported("the QEMU microvm reference runs without vsock")
        }
        // QEMU opens the tap by name: it persists once made here and is removed after the run.
        let link = try spec.net.map { try TapLink.open($0, owner: spec.name, persistent: true) }
        link?.tap.close()
        defer { link?.tap.remove() }
        var argv = arguments(for: spec, link: link)
        if let cpus = spec.slice?.cpuSet, !cpus.isEmpty { argv = ["taskset", "-c", CPUList.format(cpus)] + argv }
        let pipe = try ProcessRunner.makePipe()
        let child: ChildProcess
        do {
            child = try ChildProcess(argv, stdout: .descriptor(pipe.write), stderr: .descriptor(pipe.write), package: "qemu-system-x86")
        } catch {
            close(pipe.read); close(pipe.write)
            throw error
        }
        close(pipe.write)
        let started = Date()
        let timeout = spec.timeout
        let (parser, console, status, timedOut, bootAt) = await withCheckedContinuation { cont in
            Thread.detachNewThread {
                var parser = ConsoleParser()
                var console = Data()
                var bootAt: Date?
                var buf = [UInt8](repeating: 0, count: 65536)
                let deadline = started.addingTimeInterval(timeout)
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
                        if bootAt == nil, parser.bootComplete { bootAt = Date() }
                    }
                    if parser.report != nil {
                        // The result is in: the guest powers off next; give it a moment, then stop it.
                        if child.wait(upTo: 10) == nil { child.signal(SIGKILL) }
                        break
                    }
                    if Date() > deadline { killed = true; child.signal(SIGKILL); break }
                }
                close(pipe.read)
                let status = child.wait(timeout: 10).status
                cont.resume(returning: (parser, console, status, killed, bootAt))
            }
        }
        let total = Date().timeIntervalSince(started)
        let text = String(decoding: console, as: UTF8.self)
        guard let report = parser.report else {
            let tail = text.split(separator: "\n", omittingEmptySubsequences: false).suffix(15).joined(separator: "\n")
            if timedOut {
                throw MicroVMError(.timeout, "QEMU microvm '\(spec.name)' did not report a result within \(Int(timeout)) s; console tail:\n\(tail)")
            }
            throw MicroVMError(.guestError, "QEMU microvm '\(spec.name)' exited (status \(status)) before the guest reported a result; console tail:\n\(tail)")
        }
        return RunResult(exitStatus: report.status, output: report.outputText, bootSeconds: bootAt.map { $0.timeIntervalSince(started) },
                         totalSeconds: total, console: text)
    }
}
