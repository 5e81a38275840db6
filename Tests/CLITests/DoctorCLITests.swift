import Testing
import Foundation
import MicroVMCore

@Suite(.serialized) struct DoctorCLITests {
    struct Report: Decodable {
        struct Line: Decodable { var check: String; var verdict: String; var detail: String; var fix: String? }
        struct Profile: Decodable {
            struct KVM: Decodable { var verdict: String; var reason: String }
            var kvm: KVM
            var cgroupMode: String
        }
        var profile: Profile
        var lines: [Line]
        func line(_ name: String) -> Line? { lines.first { $0.check == name } }
    }

    static var cpuHasVirtualization: Bool {
        let info = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
        return info.contains(" svm") || info.contains(" vmx")
    }

    @Test func doctorReportsThisHostAndExitsZero() throws {
        let out = try MVM.run(["doctor", "--json"])
        #expect(out.status == 0, "\(out.stderrText)")
        let r = try JSONDecoder().decode(Report.self, from: out.stdout)
        #expect(["hardware", "emulated", "absent"].contains(r.profile.kvm.verdict))
        if FileManager.default.fileExists(atPath: "/dev/kvm") && !Self.cpuHasVirtualization {
            // A /dev/kvm without svm/vmx in cpuinfo is a software KVM: the probe must not call it hardware.
            #expect(r.profile.kvm.verdict == "emulated")
            #expect(r.line("kvm")?.verdict.hasPrefix("emulated (") == true)
            #expect(r.line("kvm")?.fix?.contains("rig") == true)
        }
        if ProcessRunner.which("qemu-system-x86_64") != nil {
            #expect(r.line("qemu")?.verdict == "usable")
            #expect(r.line("qemu")?.detail.contains("tcg") == true)
            #expect(r.line("libvirt-embed")?.verdict == "usable")
        }
        if ProcessRunner.which("runc") != nil { #expect(r.line("runc")?.verdict == "usable") }
        if r.profile.cgroupMode == "hybrid", ProcessRunner.which("crun") != nil {
            #expect(r.line("crun")?.verdict == "unusable")
            #expect(r.line("crun")?.detail.contains("hybrid") == true)
        }
    }

    @Test func doctorTextNamesFixes() throws {
        let out = try MVM.run(["doctor"])
        #expect(out.status == 0)
        #expect(out.stdoutText.contains("kvm"))
        #expect(out.stdoutText.contains("VM timings on this host:"))
    }

    @Test func doctorOnAMalformedHostReportsInsteadOfCrashing() throws {
        let dir = NSTemporaryDirectory() + "mvm-badhost-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try FileManager.default.createDirectory(atPath: dir + "/proc/self", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: dir + "/sys/devices/system/cpu", withIntermediateDirectories: true)
        try Data([0xff, 0xfe, 0x00, 0x41]).write(to: URL(fileURLWithPath: dir + "/proc/meminfo"))
        try "not a mount table".write(toFile: dir + "/proc/self/mounts", atomically: true, encoding: .utf8)
        try "0-,,x".write(toFile: dir + "/sys/devices/system/cpu/online", atomically: true, encoding: .utf8)
        let out = try MVM.run(["doctor", "--json", "--proc-root", dir + "/proc", "--sys-root", dir + "/sys"])
        #expect(out.status == 0, "\(out.stderrText)")
        let r = try JSONDecoder().decode(Report.self, from: out.stdout)
        #expect(r.profile.cgroupMode == "none")
        #expect(r.line("cpus")?.verdict == "0")
    }
}

@Suite struct RunInputErrorTests {
    @Test(arguments: [
        (["run", "--profile", "enormous", "--", "true"], "unknown profile 'enormous'"),
        (["run", "--kernel", "/nonexistent/vmlinuz", "--", "true"], "does not exist"),
        (["run", "--memory", "lots", "--", "true"], "is not a size"),
        (["run", "--cpus", "0", "--", "true"], "--cpus must be at least 1"),
        (["run", "--placement", "everywhere", "--", "true"], "unknown placement"),
        (["run", "--disk", "/nonexistent.img,ro", "--", "true"], "does not exist"),
        (["run", "--disk", "/tmp,bogus", "--", "true"], "unknown disk option"),
        (["run", "--kernel", "/etc/hostname", "--", "true"], "'/etc/hostname' is not a kernel"),
        (["run", "--net", "tap,host=1.2.3", "--", "true"], "is not an IPv4 address"),
        (["run", "--net", "bridge", "--", "true"], "--net 'bridge' is not understood"),
        (["run", "--timeout=-5", "--", "true"], "--timeout -5.0 is not a positive number"),
        (["run", "--name", "../x", "--", "true"], "instance name '../x' is not usable"),
        (["run", "--mode", "container", "--vsock", "7", "--", "true"], "containers have no vsock"),
    ])
    func badInputGivesOneClearError(args: [String], message: String) throws {
        let out = try MVM.run(args)
        #expect(out.status == 2)
        let err = out.stderrText.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(err.contains(message), "stderr was: \(err)")
        #expect(err.split(separator: "\n").count == 1, "one line expected, got: \(err)")
    }

    /// Bad input is refused before the ledger is opened, a cgroup made or a host probed: the
    /// state directory stays empty.
    @Test func badInputLeavesNothingBehind() throws {
        let state = NSTemporaryDirectory() + "mvm-badinput-\(UUID().uuidString.prefix(8))"
        defer { try? FileManager.default.removeItem(atPath: state) }
        for args in [["run", "--kernel", "/etc/hostname", "--", "true"], ["run", "--mode", "container", "--timeout=-1", "--", "true"],
                     ["run", "--mode", "hosted", "--disk", "/nonexistent/d.img", "--", "true"]] {
            let out = try MVM.run(args, environment: ["MVM_STATE_DIR": state])
            #expect(out.status == 2, "\(args): \(out.stderrText)")
        }
        let left = (try? FileManager.default.contentsOfDirectory(atPath: state)) ?? []
        #expect(left.isEmpty, "bad input left \(left) in the state directory")
    }

    @Test func configTypoIsNamed() throws {
        let file = NSTemporaryDirectory() + "mvm-badcfg-\(UUID().uuidString).yaml"
        defer { try? FileManager.default.removeItem(atPath: file) }
        try MicroVMConfig.builtinDefault.replacingOccurrences(of: "memory: 128M", with: "memroy: 128M")
            .write(toFile: file, atomically: true, encoding: .utf8)
        let out = try MVM.run(["run", "--config", file, "--", "true"])
        #expect(out.status == 2)
        #expect(out.stderrText.contains("memory"), "stderr was: \(out.stderrText)")
    }
}
