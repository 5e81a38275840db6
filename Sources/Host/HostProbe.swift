import Foundation
import MicroVMCore
import KVM

extension HostProfile {
    /// The profile of this host. The KVM functional probe is cached per boot (keyed by boot_id);
    /// the cheap probes are read fresh each time.
    public static func current(paths: Paths = .default, roots: HostRoots = HostRoots(), refresh: Bool = false) -> HostProfile {
        let bootID = bootID(roots: roots)
        let kvm = KVMVerdictCache.verdict(paths: paths, bootID: bootID, refresh: refresh)
        return probe(roots: roots, kvm: kvm, bootID: bootID)
    }

    /// Only the KVM verdict (cached per boot): what a launch needs, without probing the tools.
    public static func kvm(paths: Paths = .default, roots: HostRoots = HostRoots()) -> KVMProbeResult {
        KVMVerdictCache.verdict(paths: paths, bootID: bootID(roots: roots))
    }

    /// This boot's id: what per-boot caches are keyed by.
    static func bootID(roots: HostRoots) -> String {
        KVMVerdictCache.bootID(proc: roots.proc)
    }

    /// Builds a profile from the given roots without touching /dev/kvm (the KVM result is passed in).
    /// Never throws: a missing or malformed file becomes "unknown" in the report.
    public static func probe(roots: HostRoots, kvm: KVMProbeResult, bootID: String = "unknown") -> HostProfile {
        let mounts = read(roots.proc + "/self/mounts") ?? ""
        let cgroupMode = detectCgroupMode(mounts: mounts)
        let cpus = (read(roots.sys + "/devices/system/cpu/online")).flatMap { try? CPUList.parse($0) } ?? []
        let mem = parseMeminfo(read(roots.proc + "/meminfo") ?? "")
        let model = (read(roots.proc + "/cpuinfo") ?? "").split(separator: "\n")
            .first { $0.hasPrefix("model name") }
            .map { String($0.split(separator: ":", maxSplits: 1).last ?? "").trimmingCharacters(in: .whitespaces) } ?? "unknown"
        let kernel = read(roots.proc + "/sys/kernel/osrelease")?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "unknown"

        var caps: [String: Capability] = [:]
        caps["qemu"] = probeQEMU()
        caps["libvirt-embed"] = probeLibvirtEmbed()
        caps["libvirt-daemon"] = probeLibvirtDaemon()
        caps["runc"] = probeRuntime("runc", cgroupMode: cgroupMode)
        caps["crun"] = probeRuntime("crun", cgroupMode: cgroupMode)
        caps["runsc"] = probeRuntime("runsc", cgroupMode: cgroupMode)
        caps["docker"] = probeDocker()
        caps["libguestfs"] = probeGuestfs(kvm: kvm)
        return HostProfile(bootID: bootID, kernel: kernel, cpuModel: model, onlineCPUs: cpus,
                           memoryTotal: mem["MemTotal"] ?? 0, memoryAvailable: mem["MemAvailable"] ?? 0,
                           kvm: kvm, cgroupMode: cgroupMode, capabilities: caps)
    }

    static func read(_ path: String) -> String? { readWholeText(path) }

    public static func detectCgroupMode(mounts: String) -> CgroupMode {
        var v1 = false, v2 = false
        for line in mounts.split(separator: "\n") {
            let f = line.split(separator: " ")
            guard f.count >= 3 else { continue }
            if f[2] == "cgroup2" { v2 = true }
            if f[2] == "cgroup" && !(f.count > 3 && f[3].contains("name=systemd") && !f[3].contains(",cpu")) { v1 = true }
        }
        switch (v1, v2) {
        case (true, true): return .hybrid
        case (true, false): return .v1
        case (false, true): return .v2
        default: return .none
        }
    }

    static func parseMeminfo(_ text: String) -> [String: ByteCount] {
        var out: [String: ByteCount] = [:]
        for line in text.split(separator: "\n") {
            let parts = line.split(whereSeparator: { $0 == ":" || $0 == " " })
            guard parts.count >= 2, let kb = UInt64(parts[1]) else { continue }
            out[String(parts[0])] = .kibibytes(kb)
        }
        return out
    }

    static func probeQEMU() -> Capability {
        guard let q = ProcessRunner.which("qemu-system-x86_64") else {
            return Capability(usable: false, detail: "qemu-system-x86_64 not found", fix: "apt-get install qemu-system-x86")
        }
        let accels = (try? ProcessRunner.run([q, "-accel", "help"], timeout: 10))?.stdoutText
            .split(separator: "\n").dropFirst().map { String($0).trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty } ?? []
        let version = (try? ProcessRunner.run([q, "--version"], timeout: 10))?.stdoutText.split(separator: "\n").first.map(String.init) ?? "?"
        return Capability(usable: true, detail: "\(version); accelerators: \(accels.joined(separator: ", "))")
    }

    static let libvirtDriverDirs = ["/usr/lib/x86_64-linux-gnu/libvirt/connection-driver", "/usr/lib64/libvirt/connection-driver", "/usr/lib/libvirt/connection-driver"]

    static func probeLibvirtEmbed() -> Capability {
        let hasDriver = libvirtDriverDirs.contains { FileManager.default.fileExists(atPath: $0 + "/libvirt_driver_qemu.so") }
        guard hasDriver else {
            return Capability(usable: false, detail: "libvirt's QEMU driver module is not installed", fix: "apt-get install libvirt-daemon-driver-qemu libvirt-daemon-system")
        }
        guard ProcessRunner.which("qemu-system-x86_64") != nil else {
            return Capability(usable: false, detail: "libvirt is installed but QEMU is not", fix: "apt-get install qemu-system-x86")
        }
        let hasUser = (read("/etc/passwd") ?? "").contains("libvirt-qemu:")
        return Capability(usable: true, detail: "qemu:///embed (no daemon needed)" + (hasUser ? "" : "; no libvirt-qemu user, guests run as root"))
    }

    static func probeLibvirtDaemon() -> Capability {
        let sockets = ["/run/libvirt/libvirt-sock", "/run/libvirt/virtqemud-sock", "/var/run/libvirt/libvirt-sock"]
        if let s = sockets.first(where: { FileManager.default.fileExists(atPath: $0) }) {
            return Capability(usable: true, detail: "daemon socket \(s) (qemu:///system)")
        }
        let bin = ProcessRunner.which("libvirtd") ?? ProcessRunner.which("virtqemud")
        return Capability(usable: false, detail: bin == nil ? "no libvirt daemon installed" : "daemon installed but not running",
                          fix: bin == nil ? "apt-get install libvirt-daemon-system (only needed for qemu:///system)" : "mkdir -p /var/log/libvirt /run/libvirt && virtlogd -d && libvirtd -d (only needed for qemu:///system)")
    }

    static func probeRuntime(_ name: String, cgroupMode: CgroupMode) -> Capability {
        guard let bin = ProcessRunner.which(name) else {
            return Capability(usable: false, detail: "\(name) not found", fix: "apt-get install \(name)")
        }
        let version = (try? ProcessRunner.run([bin, "--version"], timeout: 10))?.stdoutText.split(separator: "\n").first.map(String.init) ?? name
        if name == "crun" && cgroupMode == .hybrid {
            return Capability(usable: false, detail: "\(version): refuses this host's hybrid cgroup layout (v1 controllers plus a unified mount)",
                              fix: "use runc (--runtime runc), or boot the host with a pure cgroup v1 or v2 layout")
        }
        if cgroupMode == .none {
            return Capability(usable: false, detail: "\(version): no cgroup filesystem is mounted", fix: "mount cgroups (v2: mount -t cgroup2 none /sys/fs/cgroup)")
        }
        return Capability(usable: true, detail: "\(version) (cgroup \(cgroupMode.rawValue))")
    }

    static func probeDocker() -> Capability {
        guard ProcessRunner.which("dockerd") != nil else {
            return Capability(usable: false, detail: "Docker engine not installed", fix: "apt-get install docker.io")
        }
        if FileManager.default.fileExists(atPath: "/var/run/docker.sock") {
            return Capability(usable: true, detail: "dockerd running (/var/run/docker.sock)")
        }
        return Capability(usable: false, detail: "dockerd installed but not running", fix: "dockerd --iptables=false --bridge=none &")
    }

    static func probeGuestfs(kvm: KVMProbeResult) -> Capability {
        let libs = ["/usr/lib/x86_64-linux-gnu/libguestfs.so.0", "/usr/lib64/libguestfs.so.0"]
        guard libs.contains(where: { FileManager.default.fileExists(atPath: $0) }) else {
            return Capability(usable: false, detail: "libguestfs not installed", fix: "apt-get install libguestfs-tools")
        }
        let tcg = kvm.verdict != .hardware
        return Capability(usable: true, detail: tcg ? "usable with LIBGUESTFS_BACKEND_SETTINGS=force_tcg (KVM here is not hardware; MicroVM sets it)" : "usable (KVM)")
    }
}
