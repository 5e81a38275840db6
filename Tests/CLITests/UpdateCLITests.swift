import Foundation
import Testing
import MicroVM

/// `mvm update` resizes a running instance: the grant and the limits the instance lives under
/// change together, read back from inside it; a change that does not fit, or that the instance
/// cannot take, is refused and changes nothing.
@Suite("mvm update", .serialized, .timeLimit(.minutes(5)))
struct UpdateCLITests {
    /// The memory limit (bytes) and CPU quota (µs per 100 ms) of the cgroup the command runs in,
    /// from inside: cgroup v2 or v1.
    static let readLimits = """
        if [ -f /sys/fs/cgroup/memory.max ]; then m=$(cat /sys/fs/cgroup/memory.max); q=$(cut -d' ' -f1 /sys/fs/cgroup/cpu.max)
        else m=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes); q=$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us); fi; echo "$m $q"
        """

    struct Shown: Decodable {
        struct G: Decodable { struct S: Decodable { var cpus: Int; var memory: String; var cpuWeight: Int }; var owner: String; var slice: S }
        var grants: [G]
    }

    @Test(.enabled(if: KillSafetyCLITests.canRunContainers, "needs root and runc"))
    func aRuncContainerGrowsAndShrinksLive() throws { try resizesLive(docker: false) }

    @Test(.enabled(if: KillAtPhaseCLITests.usable(.docker), "needs root and a running Docker engine"))
    func aDockerContainerGrowsAndShrinksLive() throws { try resizesLive(docker: true) }

    func resizesLive(docker: Bool) throws {
        let vm = try DetachedInstance("upd", timeout: 120)
        defer { vm.end() }
        try vm.start(["--mode", "container", "--cpus", "1", "--memory", "128M", "--timeout", "280"] + (docker ? ["--runtime", "docker"] : []) + ["--", "sleep", "280"])
        func inside() throws -> String {
            try vm.run(["exec", vm.name, "--", "sh", "-c", Self.readLimits]).stdoutText.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        func grant() throws -> Shown.G.S? {
            try JSONDecoder().decode(Shown.self, from: vm.run(["alloc", "show", "--json"]).stdout).grants.first { $0.owner == vm.name }?.slice
        }
        #expect(try inside() == "134217728 100000")

        // Refused by the kernel (the container holds 60 MB in its tmpfs, more than 16M): the CPU
        // the first step had already granted and enforced goes back too.
        #expect(try vm.run(["exec", vm.name, "--", "sh", "-c", "head -c 60000000 /dev/zero > /tmp/fill"]).status == 0)
        let tight = try vm.run(["update", vm.name, "--cpus", "2", "--memory", "16M"])
        #expect(tight.status == 2 && tight.stderrText.contains("nothing was changed"), "\(tight.stderrText)")
        #expect(try inside() == "134217728 100000")
        #expect(try grant().map { ($0.cpus, $0.memory, $0.cpuWeight) } ?? (0, "", 0) == (1, "128M", 100))

        let grow = try vm.run(["update", vm.name, "--cpus", "2", "--memory", "256M", "--weight", "200"])
        #expect(grow.status == 0 && grow.stdoutText.contains("2 CPUs") && grow.stdoutText.contains("256M"), "\(grow.stdoutText)\(grow.stderrText)")
        #expect(try inside() == "268435456 200000")
        #expect(try grant().map { ($0.cpus, $0.memory, $0.cpuWeight) } ?? (0, "", 0) == (2, "256M", 200))
        if !docker { #expect(try vm.run(["ps"]).stdoutText.contains("256M"), "mvm ps shows the new size") }

        // Refused by the allocator: nothing changes.
        let huge = try vm.run(["update", vm.name, "--memory", "100T"])
        #expect(huge.status == 2 && huge.stderrText.contains("memory"), "\(huge.stderrText)")
        #expect(try inside() == "268435456 200000")

        // Down to one CPU and 192M: enforced first, then given back.
        let shrink = try vm.run(["update", vm.name, "--cpus", "1", "--memory", "192M"])
        #expect(shrink.status == 0, "\(shrink.stderrText)")
        #expect(try inside() == "201326592 100000")
        #expect(try grant().map { ($0.cpus, $0.memory) } ?? (0, "") == (1, "192M"))
    }

    /// A direct VM's weight and quota change live in its VMM's cgroup; its vCPU count and memory
    /// are refused before anything changes.
    @Test(.enabled(if: getuid() == 0 && HostProfile.current().kvm.verdict != .absent, "needs root and /dev/kvm"))
    func aDirectVMChangesItsWeightAndRefusesNewVCPUs() throws {
        let vm = try DetachedInstance("updd", env: ["MVM_DIRECT_ALLOW_EMULATED": "1"], timeout: 60)
        defer { vm.end() }
        let kernel = vm.dir + "/tiny.elf"
        try Data(TinyGuest.pvhELF()).write(to: URL(fileURLWithPath: kernel))
        try vm.start(["--mode", "direct", "--kernel", kernel, "--no-rootfs", "--memory", "64M", "--timeout", "120", "--", "true"])
        let cgroup = try CgroupSet.existing(name: "microvm/direct-\(vm.name)")
        func weight() -> String? {
            if let d = cgroup.directories["cpu"] { return try? String(contentsOfFile: d + "/cpu.shares", encoding: .utf8) }
            return cgroup.directories["unified"].flatMap { try? String(contentsOfFile: $0 + "/cpu.weight", encoding: .utf8) }
        }
        let before = weight()
        #expect(before != nil)
        let up = try vm("update", vm.name, "--weight", "300")
        #expect(up.status == 0, "\(up.stderrText)")
        let after = weight()?.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(after == (cgroup.mode == .v2 ? "300" : "3072"), "\(after ?? "none")")
        let cpus = try vm("update", vm.name, "--cpus", "2")
        #expect(cpus.status == 2 && cpus.stderrText.contains("vCPU count"), "\(cpus.stderrText)")
        let memory = try vm("update", vm.name, "--memory", "128M")
        #expect(memory.status == 2 && memory.stderrText.contains("memory"), "\(memory.stderrText)")
        #expect(memory.stderrText.contains("start it with --balloon"), "\(memory.stderrText)")
        #expect(weight()?.trimmingCharacters(in: .whitespacesAndNewlines) == after)
        #expect(try vm("alloc", "show").stdoutText.contains("64M memory, weight 300"))
    }

    /// A direct VM with a balloon: its memory moves through it, up to what it booted with. This
    /// tiny guest has no balloon driver, so it never fills the balloon: the shrink times out, the
    /// balloon goes back to empty and nothing changes. (A Linux guest's balloon runs in the rig.)
    @Test(.enabled(if: getuid() == 0 && HostProfile.current().kvm.verdict != .absent, "needs root and /dev/kvm"))
    func aDirectVMsMemoryMovesThroughItsBalloonOnly() throws {
        let vm = try DetachedInstance("updb", env: ["MVM_DIRECT_ALLOW_EMULATED": "1", "MVM_BALLOON_WAIT": "1"], timeout: 60)
        defer { vm.end() }
        let kernel = vm.dir + "/tiny.elf"
        try Data(TinyGuest.pvhELF()).write(to: URL(fileURLWithPath: kernel))
        try vm.start(["--mode", "direct", "--kernel", kernel, "--no-rootfs", "--memory", "64M", "--balloon", "--timeout", "120", "--", "true"])
        let stats = try vm("stats", vm.name)
        #expect(stats.stdoutText.contains("mvm_vmm_balloon_target_bytes 0"), "\(stats.stdoutText)\(stats.stderrText)")
        let more = try vm("update", vm.name, "--memory", "128M")
        #expect(more.status == 2 && more.stderrText.contains("at most"), "\(more.stderrText)")
        let less = try vm("update", vm.name, "--memory", "48M")
        #expect(less.status == 2 && less.stderrText.contains("nothing was changed") && less.stderrText.contains("balloon"), "\(less.stderrText)")
        #expect(try vm("stats", vm.name).stdoutText.contains("mvm_vmm_balloon_target_bytes 0"), "the balloon is emptied again")
        #expect(try vm("alloc", "show").stdoutText.contains("64M memory"))
        #expect(try vm("ps").stdoutText.contains("64M"))
    }

    /// A hosted VM's weight and quota change live in the cgroup libvirt made for its domain; its
    /// vCPUs and memory are refused before anything changes.
    @Test(.enabled(if: KillSafetyCLITests.canRunHosted, "needs root and libvirt's embedded QEMU driver"))
    func aHostedVMChangesItsWeightAndQuota() throws {
        let vm = try DetachedInstance("updh", timeout: 300)
        defer { vm.end() }
        try vm.start(["--mode", "hosted", "--memory", "256M", "--timeout", "280", "--", "sleep", "270"])
        let pid = try #require(try vm("ps").stdoutText.split(separator: "\n").first { $0.hasPrefix(vm.name + " ") }
            .flatMap { Int32($0.split(separator: " ", omittingEmptySubsequences: true)[5]) })
        let dirs = HostedBackend.domainCgroups(of: pid)
        func read(_ file: String) -> String? { try? String(contentsOfFile: file, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines) }
        func limits() -> String? {
            if let cpu = dirs["cpu"] { return read(cpu + "/cpu.shares").flatMap { s in read(cpu + "/cpu.cfs_quota_us").map { s + " " + $0 } } }
            return dirs["unified"].flatMap { u in read(u + "/cpu.weight").flatMap { w in read(u + "/cpu.max").map { w + " " + $0 } } }
        }
        let v1 = dirs["cpu"] != nil
        if v1 { #expect(limits() == "1024 100000", "\(dirs)") }
        let up = try vm("update", vm.name, "--weight", "200", "--quota", "0.5")
        #expect(up.status == 0, "\(up.stderrText)")
        #expect(limits() == (v1 ? "2048 50000" : "200 50000 100000"))
        let cpus = try vm("update", vm.name, "--cpus", "2")
        #expect(cpus.status == 2 && cpus.stderrText.contains("--max-cpus 2"), "\(cpus.stderrText)")
        let memory = try vm("update", vm.name, "--memory", "512M")
        #expect(memory.status == 2 && memory.stderrText.contains("memory"), "\(memory.stderrText)")
        #expect(limits() == (v1 ? "2048 50000" : "200 50000 100000"))
        #expect(try vm("alloc", "show").stdoutText.contains("256M memory, weight 200, quota 0.5 CPUs"))
    }

    /// A hosted VM booted with one vCPU and room for two (`--max-cpus 2`): `mvm update --cpus`
    /// plugs the second in and takes it out again through libvirt, the guest sees it come and go
    /// (it prints the CPUs it has online every second), and the domain's CPU quota follows.
    /// Under TCG QEMU 7.2 sends libvirt no DEVICE_DELETED for an ejected vCPU, so libvirt keeps
    /// counting it: growing again must then be refused with that said and nothing changed (with
    /// KVM it works; the rig's `hosted-vcpus` step shows it).
    @Test(.enabled(if: KillSafetyCLITests.canRunHosted, "needs root and libvirt's embedded QEMU driver"))
    func aHostedVMGetsAndLosesVCPUsLive() throws {
        let vm = try DetachedInstance("updhc", timeout: 300)
        defer { vm.end() }
        try vm.start(["--mode", "hosted", "--cpus", "1", "--max-cpus", "2", "--memory", "256M", "--timeout", "280", "--", "sh", "-c",
                      "while :; do echo online=$(cat /sys/devices/system/cpu/online) >/dev/ttyS0; sleep 1; done"])
        /// The CPUs the guest has online, once it printed `more` lines after `after`.
        func online(after: Int = 0, _ more: Int = 2) throws -> (cpus: String, lines: Int) {
            let deadline = Date().addingTimeInterval(120)
            var lines: [String] = []
            while Date() < deadline {
                lines = try vm("logs", vm.name).stdoutText.split(whereSeparator: \.isNewline).filter { $0.hasPrefix("online=") }.map { String($0.dropFirst(7)) }
                if lines.count >= after + more { break }
                usleep(500_000)
            }
            return (try #require(lines.last, "the guest printed no online CPUs"), lines.count)
        }
        let pid = try #require(try vm("ps").stdoutText.split(separator: "\n").first { $0.hasPrefix(vm.name + " ") }
            .flatMap { Int32($0.split(separator: " ", omittingEmptySubsequences: true)[5]) })
        let dirs = HostedBackend.domainCgroups(of: pid)
        func quota() -> String? {
            let file = dirs["cpu"].map { $0 + "/cpu.cfs_quota_us" } ?? dirs["unified"].map { $0 + "/cpu.max" }
            return file.flatMap { try? String(contentsOfFile: $0, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines) }
        }
        let v1 = dirs["cpu"] != nil
        let booted = try online()
        #expect(booted.cpus == "0")
        let grow = try vm("update", vm.name, "--cpus", "2")
        #expect(grow.status == 0, "\(grow.stderrText)")
        let grown = try online(after: booted.lines, 3)
        #expect(grown.cpus == "0-1", "the guest must bring the plugged vCPU online")
        #expect(quota() == (v1 ? "200000" : "200000 100000"))
        #expect(try vm("alloc", "show").stdoutText.contains("2 CPUs"))
        let shrink = try vm("update", vm.name, "--cpus", "1")
        #expect(shrink.status == 0, "\(shrink.stderrText)")
        let shrunk = try online(after: grown.lines, 3)
        #expect(shrunk.cpus == "0", "the guest must let the vCPU go")
        #expect(quota() == (v1 ? "100000" : "100000 100000"))
        #expect(try vm("ps").stdoutText.split(separator: "\n").first { $0.hasPrefix(vm.name + " ") }?.split(separator: " ", omittingEmptySubsequences: true)[3] == "1")
        let again = try vm("update", vm.name, "--cpus", "2")
        if again.status == 0 {
            #expect(try online(after: shrunk.lines, 3).cpus == "0-1")
        } else {
            #expect(again.stderrText.contains("libvirt counts 2"), "\(again.stderrText)")
            #expect(quota() == (v1 ? "100000" : "100000 100000"), "a refused change leaves the quota")
            #expect(try vm("alloc", "show").stdoutText.contains("1 CPU on"), "and the grant")
        }
    }

    /// A hosted VM with a balloon (libvirt's virtio memballoon, free page reporting on): its
    /// memory moves live through the run's control API, and the guest's available memory, which
    /// it prints to its console every second, follows; the domain's memory limit moves with it.
    @Test(.enabled(if: KillSafetyCLITests.canRunHosted, "needs root and libvirt's embedded QEMU driver"))
    func aHostedVMsMemoryMovesThroughItsBalloon() throws {
        let vm = try DetachedInstance("updhb", timeout: 300)
        defer { vm.end() }
        try vm.start(["--mode", "hosted", "--memory", "512M", "--balloon", "--timeout", "280", "--", "sh", "-c", "while :; do grep MemAvailable /proc/meminfo >/dev/ttyS0; sleep 1; done"])
        /// The guest's latest MemAvailable (KiB) once `n` more lines came than `after`.
        func available(after: Int = 0, _ more: Int = 2) throws -> (kib: Int, lines: Int) {
            let deadline = Date().addingTimeInterval(120)
            var lines: [Int] = []
            var text = ""
            while Date() < deadline {
                let out = try vm("logs", vm.name)
                text = out.stdoutText + out.stderrText
                lines = text.split(whereSeparator: \.isNewline).filter { $0.hasPrefix("MemAvailable:") }
                    .compactMap { Int($0.split(separator: " ", omittingEmptySubsequences: true)[1]) }
                if lines.count >= after + more { break }
                usleep(500_000)
            }
            return (try #require(lines.last, "the guest printed no MemAvailable: \(text.suffix(1500))"), lines.count)
        }
        let before = try available()
        let shrink = try vm("update", vm.name, "--memory", "256M")
        #expect(shrink.status == 0, "\(shrink.stderrText)")
        let shrunk = try available(after: before.lines)
        #expect(before.kib - shrunk.kib >= 200 << 10, "a 256 MiB balloon must take the guest's available memory down: \(before.kib) → \(shrunk.kib) KiB")
        #expect(try vm("ps").stdoutText.contains("256M"))
        #expect(try vm("stats", vm.name).stdoutText.contains("mvm_hosted_balloon_actual_bytes 268435456"))
        let pid = try #require(try vm("ps").stdoutText.split(separator: "\n").first { $0.hasPrefix(vm.name + " ") }
            .flatMap { Int32($0.split(separator: " ", omittingEmptySubsequences: true)[5]) })
        if let memory = HostedBackend.domainCgroups(of: pid)["memory"] {
            let limit = try String(contentsOfFile: memory + "/memory.limit_in_bytes", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(limit == "\((ByteCount.mebibytes(256) + Enforcement.overhead(for: .hosted)).bytes)")
        }
        let beyond = try vm("update", vm.name, "--memory", "1G")
        #expect(beyond.status == 2 && beyond.stderrText.contains("at most"), "\(beyond.stderrText)")
        let grow = try vm("update", vm.name, "--memory", "512M")
        #expect(grow.status == 0, "\(grow.stderrText)")
        let grown = try available(after: shrunk.lines, 3)
        #expect(grown.kib - shrunk.kib >= 200 << 10, "emptying the balloon must give the memory back: \(shrunk.kib) → \(grown.kib) KiB")
        print("hosted (TCG) balloon: MemAvailable \(before.kib / 1024) → \(shrunk.kib / 1024) → \(grown.kib / 1024) MiB")
    }

    /// `mvm alloc rebalance` takes an idle ballooned VM down to what it uses plus the headroom
    /// (here the 128M floor), in the ledger too; `--dry-run` only says so.
    @Test(.enabled(if: KillSafetyCLITests.canRunHosted, "needs root and libvirt's embedded QEMU driver"))
    func rebalanceShrinksAnIdleBalloonedVM() throws {
        let vm = try DetachedInstance("rebal", timeout: 300)
        defer { vm.end() }
        try vm.start(["--mode", "hosted", "--memory", "512M", "--balloon", "--timeout", "280", "--", "sleep", "270"])
        // The guest reports its use once its balloon driver runs (statistics every second).
        var plan = ""
        for _ in 0..<60 {
            plan = try vm("alloc", "rebalance", "--dry-run").stdoutText
            if plan.contains("planned") { break }
            usleep(500_000)
        }
        #expect(plan.contains(vm.name) && plan.contains("128M") && plan.contains("planned"), "\(plan)")
        #expect(try vm("ps").stdoutText.contains("512M"), "a dry run changes nothing")
        let done = try vm("alloc", "rebalance")
        #expect(done.status == 0 && done.stdoutText.contains("resized"), "\(done.stdoutText)\(done.stderrText)")
        #expect(try vm("ps").stdoutText.contains("128M"))
        #expect(try vm("alloc", "show").stdoutText.contains("128M memory"))
        let bad = try vm("alloc", "rebalance", "--headroom", "20")
        #expect(bad.status == 2 && bad.stderrText.contains("--headroom"), "\(bad.stderrText)")
    }
}

/// One detached instance in a state directory of its own: `vm("ps")` runs `mvm` there, `start`
/// runs `mvm run -d --name NAME …`, `end()` stops it and removes the directory.
final class DetachedInstance {
    let env: [String: String]
    let dir: String
    let name: String
    let timeout: Double

    /// `sharing`: run in that instance's state directory (its ledger and records) instead of a
    /// new one; that instance removes it.
    init(_ tag: String, env extra: [String: String] = [:], timeout: Double = 300, sharing: DetachedInstance? = nil) throws {
        let (env, dir) = try sharing.map { ($0.env, $0.dir) } ?? KillSafetyCLITests.stateDirectory()
        self.env = env.merging(extra) { $1 }
        self.dir = dir
        self.timeout = timeout
        owner = sharing == nil
        name = "\(tag)-\(UUID().uuidString.prefix(6).lowercased())"
    }
    let owner: Bool

    func callAsFunction(_ args: String...) throws -> ProcessRunner.Output { try run(args) }
    func run(_ args: [String]) throws -> ProcessRunner.Output { try MVM.run(args, environment: env, timeout: timeout) }

    func start(_ args: [String]) throws {
        let r = try run(["run", "-d", "--name", name] + args)
        try #require(r.status == 0, "\(r.stderrText)")
    }

    func end() {
        _ = try? run(["stop", name])
        if owner { KillSafetyCLITests.removeStateDirectory(dir) }
    }
}
