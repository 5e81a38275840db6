import Foundation
import Testing
import MicroVM

/// The direct VMM's jail, read from the outside: a detached instance's VMM is pid 1 of its own
/// PID namespace, in mount, IPC and UTS namespaces of its own, with an empty root, its
/// instance's unprivileged uid, no capabilities, no_new_privs and seccomp filters (the vCPU
/// thread's narrower than the process's); `--no-jail` says so in `mvm ps`; a forbidden call
/// from any kind of thread ends the VMM with SIGSYS's status and a line naming the call.
@Suite("The direct VMM's jail", .serialized, .timeLimit(.minutes(3)))
struct JailCLITests {
    static let canRun = getuid() == 0 && HostProfile.current().kvm.verdict != .absent

    /// /proc/PID/status as fields.
    static func status(_ path: String) -> [String: String] {
        let text = (try? String(contentsOfFile: path + "/status", encoding: .utf8)) ?? ""
        var out: [String: String] = [:]
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: ":", maxSplits: 1)
            if parts.count == 2 { out[String(parts[0])] = parts[1].trimmingCharacters(in: .whitespaces) }
        }
        return out
    }

    static func namespace(_ pid: String, _ kind: String) -> String {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/ns/\(kind)")) ?? "?"
    }

    @Test(.enabled(if: canRun, "needs root and /dev/kvm"))
    func aDetachedVMMRunsInItsJail() throws {
        let dir = "/tmp/mvm-jail-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let kernel = dir + "/tiny.elf"
        try Data(TinyGuest.pvhELF()).write(to: URL(fileURLWithPath: kernel))
        let env = ["MVM_STATE_DIR": dir + "/state", "MVM_DIRECT_ALLOW_EMULATED": "1"]
        func mvm(_ args: String...) throws -> ProcessRunner.Output { try MVM.run(args, environment: env, timeout: 60) }
        func mvm(_ args: [String]) throws -> ProcessRunner.Output { try MVM.run(args, environment: env, timeout: 60) }

        for jailed in [true, false] {
            let name = "jail-\(UUID().uuidString.prefix(6).lowercased())"
            let run = try mvm(["run", "-d", "--mode", "direct", "--kernel", kernel, "--no-rootfs", "--name", name, "--timeout", "120"]
                                  + (jailed ? [] : ["--no-jail"]) + ["--", "true"])
            #expect(run.status == 0, "\(run.stdoutText) \(run.stderrText)")
            defer { _ = try? mvm("stop", name) }
            let ps = try mvm("ps", "--json")
            let decoder = JSONDecoder()
            decoder.dateDecodingStrategy = .iso8601
            let all = try decoder.decode([InstanceInfo].self, from: Data(ps.stdoutText.utf8))
            let outFile = run.stderrText.split(separator: " ").last.map { String($0).trimmingCharacters(in: .whitespacesAndNewlines) } ?? ""
            let info = try #require(all.first { $0.name == name }, "gone: \((try? String(contentsOfFile: outFile, encoding: .utf8)) ?? "-")")
            let pid = String(try #require(info.pid))
            // `run -d` returns once the VMM runs; it may still be building the machine.
            func threadNames() -> [String: String] {
                let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
                return Dictionary(uniqueKeysWithValues: tasks.map { t in
                    (t, ((try? String(contentsOfFile: "/proc/\(pid)/task/\(t)/comm", encoding: .utf8)) ?? "?").trimmingCharacters(in: .whitespacesAndNewlines))
                })
            }
            // A wait, not a time target: a loaded machine may take a while to build it.
            let deadline = Date().addingTimeInterval(60)
            while !threadNames().values.contains("vcpu0") && Date() < deadline { usleep(20_000) }
            let fields = Self.status("/proc/" + pid)
            if fields.isEmpty {  // gone: what the detached run said is the reason
                Issue.record("the VMM ended early: \((try? String(contentsOfFile: outFile, encoding: .utf8)) ?? "-")")
                continue
            }
            // Every thread sits in the instance's cgroups: the VMM joined them while it had one.
            let cgroups = threadNames().keys.sorted().map { t in
                (t, (try? String(contentsOfFile: "/proc/\(pid)/task/\(t)/cgroup", encoding: .utf8)) ?? "")
            }
            let own = "/microvm/direct-\(name)"
            #expect(cgroups.count >= 2 && cgroups.allSatisfy { $0.1.contains(own) && $0.1 == cgroups[0].1 },
                    "threads outside \(own): \(cgroups)")
            if !jailed {
                #expect(info.state == "running" && info.note == "no jail")
                #expect(try mvm("ps").stdoutText.split(separator: "\n").contains { $0.hasPrefix(name) && $0.hasSuffix("no jail") })
                #expect(fields["Uid"]?.hasPrefix("0\t") == true, "\(fields["Uid"] ?? "")")
                #expect(Self.namespace(pid, "mnt") == Self.namespace("self", "mnt"))
                continue
            }
            #expect(info.state == "running" && info.note == nil)
            let uid = String(Jail.uid(for: name))
            #expect(fields["Uid"] == [uid, uid, uid, uid].joined(separator: "\t"), "\(fields["Uid"] ?? "")")
            #expect(fields["Gid"]?.hasPrefix(uid + "\t") == true)
            #expect(fields["Groups"] == "")
            #expect(fields["CapEff"] == "0000000000000000" && fields["CapPrm"] == "0000000000000000" && fields["CapBnd"] == "0000000000000000",
                    "\(fields["CapEff"] ?? "") \(fields["CapBnd"] ?? "")")
            #expect(fields["NoNewPrivs"] == "1" && fields["Seccomp"] == "2")
            // pid 1 of a namespace of its own: NSpid lists the host's pid, then 1.
            #expect(fields["NSpid"] == pid + "\t1", "\(fields["NSpid"] ?? "")")
            for ns in ["mnt", "ipc", "uts", "pid"] {
                #expect(Self.namespace(pid, ns) != Self.namespace("self", ns), "the VMM shares our \(ns) namespace")
            }
            let ls = try ProcessRunner.run(["ls", "-a", "/proc/\(pid)/root/"])
            #expect(ls.status == 0 && ls.stdoutText == ".\n..\n", "the jail's root is not empty: \(ls.stdoutText) \(ls.stderrText)")
            // Each vCPU thread narrows the process's filter with its kind's.
            let names = threadNames()
            let vcpu = try #require(names.first { $0.value == "vcpu0" }?.key, "threads: \(names)")
            let mainFilters = Int(Self.status("/proc/\(pid)/task/\(pid)")["Seccomp_filters"] ?? "") ?? 0
            let vcpuFilters = Int(Self.status("/proc/\(pid)/task/\(vcpu)")["Seccomp_filters"] ?? "") ?? 0
            #expect(mainFilters >= 1 && vcpuFilters == mainFilters + 1, "filters: main \(mainFilters), vcpu0 \(vcpuFilters)")
            // The jailed VMM still answers its API, and its stop still cleans up.
            #expect(try mvm("pause", name).status == 0)
            #expect(try mvm("resume", name).status == 0)
            let stop = try mvm("stop", name)
            #expect(stop.status == 0, "\(stop.stderrText)")
            #expect(!FileManager.default.fileExists(atPath: dir + "/state/instances/\(name)/api.sock"), "the API socket outlived its VMM")
        }
    }

    /// A guest that triple-faults (ud2 with no IDT) ends mvm-vmm with status 1 and a line that
    /// gives the reason and the vCPU's registers, which the reason alone does not carry.
    @Test(.enabled(if: canRun, "needs root and /dev/kvm"))
    func aTripleFaultIsReportedWithTheVCPUsRegisters() throws {
        let binary = try #require(VMMProcess.companion("mvm-vmm", environment: "MVM_VMM"))
        let dir = NSTemporaryDirectory() + "mvm-triple-\(getpid())"
        try Paths.ensureDirectory(dir)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Data(TinyGuest.pvhELF(code: [0x0f, 0x0b])).write(to: URL(fileURLWithPath: dir + "/ud2.elf"))
        let config = #"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64}, "boot-source": {"kernel_image_path": "\#(dir)/ud2.elf"}}"#
        try config.write(toFile: dir + "/vm.json", atomically: true, encoding: .utf8)
        let out = try ProcessRunner.run([binary, "--config-file", dir + "/vm.json", "--console-log", "/dev/null"],
                                        environment: ["MVM_DIRECT_ALLOW_EMULATED": "1"], timeout: 60)
        #expect(out.status == 1, "status \(out.status): \(out.stderrText)")
        #expect(out.stderrText.contains("the VM stopped: guest triple-faulted") && out.stderrText.contains("rip=0x"), "\(out.stderrText)")
    }

    @Test(.enabled(if: canRun, "needs root"), arguments: VMMThreadKind.allCases)
    func aForbiddenCallEndsTheVMMWithSIGSYS(kind: VMMThreadKind) throws {
        let binary = try #require(VMMProcess.companion("mvm-vmm", environment: "MVM_VMM"))
        let id = String(Jail.uid(for: "seccomp-test"))
        let out = try ProcessRunner.run([binary, "--jail-uid", id, "--jail-gid", id, "--seccomp-check", kind.rawValue], timeout: 20)
        let label = ["vcpu": "vCPU", "device": "device I/O", "api": "API"][kind.rawValue]!
        #expect(out.status == 128 + SIGSYS, "status \(out.status): \(out.stderrText)")
        #expect(out.stderrText.contains("seccomp: the \(label) thread made the system call socket (41)"), "\(out.stderrText)")
    }

    @Test func noJailIsForDirectModeOnly() throws {
        let out = try MVM.run(["run", "--mode", "container", "--no-jail", "--", "true"])
        #expect(out.status != 0 && out.stderrText.contains("--no-jail is for --mode direct"), "\(out.stderrText)")
    }
}
