import ArgumentParser
import Foundation
import MicroVM

struct DoctorCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "doctor",
        abstract: "Report what this host can run: KVM (hardware, emulated or absent), QEMU, libvirt, OCI runtimes, cgroups, libguestfs, images.")

    @Flag(help: "Print the report as JSON.") var json = false
    @Flag(help: "Run the KVM functional probe again instead of using this boot's cached result.") var refresh = false
    @Option(help: ArgumentHelp("Read /proc from this directory (for testing against a fake host).", visibility: .hidden)) var procRoot: String?
    @Option(help: ArgumentHelp("Read /sys from this directory (for testing against a fake host).", visibility: .hidden)) var sysRoot: String?

    func run() async throws {
        try await reportingErrors {
            let report = DoctorReport.make(refresh: refresh, roots: HostRoots(proc: procRoot ?? "/proc", sys: sysRoot ?? "/sys"))
            if json {
                let enc = JSONEncoder()
                enc.outputFormatting = [.prettyPrinted, .sortedKeys]
                print(String(decoding: try enc.encode(report), as: UTF8.self))
            } else {
                print(report.text)
            }
        }
    }
}

/// The doctor's report: the host profile plus what other modules say (images, rig).
struct DoctorReport: Codable {
    struct Line: Codable {
        var check: String
        var verdict: String
        var detail: String
        var fix: String?
    }
    var profile: HostProfile
    var lines: [Line]

    static func make(refresh: Bool, roots: HostRoots) -> DoctorReport {
        let fake = roots.proc != "/proc" || roots.sys != "/sys"
        let p: HostProfile = fake
            ? HostProfile.probe(roots: roots, kvm: KVMFunctionalProbe.run())
            : HostProfile.current(refresh: refresh)
        var lines: [Line] = []
        let k = p.kvm
        var facts: [String] = []
        if let v = k.apiVersion { facts.append("/dev/kvm API version \(v)") }
        if let ns = k.cpl0NanosecondsPerIteration { facts.append(String(format: "CPL0 loop %.1f ns/iteration", ns)) }
        if let c = k.cmpxchg16bWorks { facts.append("lock cmpxchg16b \(c ? "works" : "fails")") }
        let kvmDetail = k.verdict == .emulated || facts.isEmpty ? (facts.isEmpty ? k.reason : facts.joined(separator: "; ")) : k.reason + "; " + facts.joined(separator: "; ")
        let kvmFix: String? = switch k.verdict {
        case .hardware: nil
        case .emulated: "guest kernels cannot boot under this KVM: use --mode hosted (QEMU TCG) or run KVM workloads inside `mvm rig run`"
        case .absent: "load kvm_intel or kvm_amd (modprobe) and check /dev/kvm permissions, or use --mode hosted (TCG)"
        }
        lines.append(Line(check: "kvm", verdict: k.verdict == .emulated ? "emulated (\(k.reason))" : k.verdict.rawValue, detail: kvmDetail, fix: kvmFix))
        lines.append(Line(check: "cgroups", verdict: p.cgroupMode.rawValue, detail: "cgroup layout \(p.cgroupMode.rawValue)",
                          fix: p.cgroupMode == .none ? "mount a cgroup filesystem" : nil))
        for name in ["qemu", "libvirt-embed", "libvirt-daemon", "runc", "crun", "runsc", "docker", "libguestfs"] {
            let c = p.capability(name)
            lines.append(Line(check: name, verdict: c.usable ? "usable" : "unusable", detail: c.detail, fix: c.fix))
        }
        for (name, c) in extraCapabilities() {
            lines.append(Line(check: name, verdict: c.usable ? "usable" : "unusable", detail: c.detail, fix: c.fix))
        }
        let link = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/usr/local/bin/mvm-runtime"))
        let vmMode = BackendCatalog.runtimeVMMode(kvm: k.verdict)
        lines.append(Line(check: "mvm-runtime", verdict: "containers run as \(vmMode.rawValue) VMs",
                          detail: (k.verdict == .hardware ? "KVM is real (or nested): the direct VMM" : "no usable KVM: hosted QEMU (TCG)")
                              + "; /usr/local/bin/mvm-runtime " + (link.map { "-> \($0)" } ?? "is not installed"),
                          fix: link == nil ? "scripts/setup-runtime (a link named mvm-runtime to mvm, Docker's and containerd's runtime entries)" : nil))
        lines.append(Line(check: "cpus", verdict: "\(p.onlineCPUs.count)", detail: "online CPUs \(CPUList.format(p.onlineCPUs)); \(p.cpuModel)"))
        lines.append(Line(check: "memory", verdict: "\(p.memoryAvailable.mebibytes)M free",
                          detail: "\(p.memoryTotal.mebibytes)M total, \(p.memoryAvailable.mebibytes)M available"))
        return DoctorReport(profile: p, lines: lines)
    }

    var text: String {
        var out = "MicroVM doctor — \(profile.cpuModel), kernel \(profile.kernel)\n"
        let w = (lines.map(\.check.count).max() ?? 8) + 2
        for l in lines {
            out += l.check.padding(toLength: w, withPad: " ", startingAt: 0) + l.verdict + "\n"
            out += String(repeating: " ", count: w) + l.detail + "\n"
            if let fix = l.fix { out += String(repeating: " ", count: w) + "fix: " + fix + "\n" }
        }
        out += "VM timings on this host: \(profile.vmAcceleration)"
        return out
    }
}
