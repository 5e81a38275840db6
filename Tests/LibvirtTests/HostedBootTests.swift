import Foundation
import Testing
@testable import Libvirt
import Images
import MicroVMCore
#if canImport(Glibc)
import Glibc
#endif

/// Real boots of the default image through libvirt's embedded QEMU driver (TCG where KVM is not
/// hardware). One embedded root serves the whole test process: libvirt initialises the embedded
/// driver once per process.
nonisolated(unsafe) private var hostedTestStateDir: String?

enum HostedBootHost {
    static let canBoot: Bool = ProcessRunner.which("qemu-system-x86_64") != nil
        && FileManager.default.fileExists(atPath: "/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so")
        && ((try? FileManager.default.contentsOfDirectory(atPath: "/boot"))?.contains { $0.hasPrefix("vmlinuz-") } ?? false)
}

@Suite("hosted boots", .serialized, .timeLimit(.minutes(10)),
       .enabled(if: HostedBootHost.canBoot, "needs qemu-system-x86_64, libvirt's QEMU driver and the default image's inputs (/boot/vmlinuz-*)"))
struct HostedBootTests {

    static let paths: Paths = {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mvm-hosted-\(getpid())").path
        // The embedded driver holds its root until the process ends, so the root goes at exit.
        hostedTestStateDir = dir
        atexit { if let d = hostedTestStateDir { try? FileManager.default.removeItem(atPath: d) } }
        return Paths(state: dir, cache: Paths.default.cache)
    }()

    static func backend() -> HostedBackend {
        HostedBackend(paths: paths, image: { try ImageStore(paths: paths).ensureDefault() })
    }

    /// Every process whose command line names this guest (libvirt runs QEMU as `-name guest=NAME,…`).
    static func qemuProcesses(named name: String) -> [Int32] {
        let pids = (try? FileManager.default.contentsOfDirectory(atPath: "/proc"))?.compactMap { Int32($0) } ?? []
        return pids.filter { pid in
            guard let d = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
            return String(decoding: d, as: UTF8.self).contains("guest=\(name),")
        }
    }

    /// Nothing of a finished run may remain: QEMU, the domain, the run directory, the record.
    static func expectNothingLeft(_ name: String, backend: HostedBackend) throws {
        #expect(qemuProcesses(named: name).isEmpty)
        #expect(try backend.connection().lookup(name: name) == nil)
        #expect(!FileManager.default.fileExists(atPath: paths.libvirtRoot + "/runs/" + name))
        #expect(HostedRecord.load(name, in: paths.instances + "/hosted") == nil)
        #expect(!FileManager.default.fileExists(atPath: EmbeddedRoots.own(paths) + "/run/qemu/\(name).pid"))
    }

    /// Resident KiB of QEMU's guest-RAM mapping: the anonymous mapping exactly as large as the guest's memory.
    static func guestRAMResident(pid: Int32, size: UInt64) -> UInt64? {
        guard let smaps = try? String(contentsOfFile: "/proc/\(pid)/smaps", encoding: .utf8) else { return nil }
        var inRAM = false
        for line in smaps.split(separator: "\n") {
            // QEMU over-allocates anonymous RAM by up to its 2 MiB alignment.
            if line.hasPrefix("Size:") { inRAM = kib("Size", in: String(line)).map { $0 >= size && $0 <= size + 4096 } ?? false }
            else if inRAM, line.hasPrefix("Rss:") { return kib("Rss", in: String(line)) }
        }
        return nil
    }

    static func kib(_ field: String, in smaps: String) -> UInt64? {
        smaps.split(separator: "\n").first { $0.hasPrefix(field + ":") }
            .flatMap { UInt64($0.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "") }
    }

    @Test func bootsRunsACommandAndLeavesNothing() async throws {
        let backend = Self.backend()
        let name = "mvm-boot-\(UUID().uuidString.prefix(6).lowercased())"
        let spec = VMSpec(name: name, cpus: 1, memory: .mebibytes(128), command: ["sh", "-c", "echo hello; exit 3"], timeout: 420)
        // Samples QEMU's memory while the guest runs: the last sample before it exits.
        let sampler = Task { () -> (pss: UInt64, rss: UInt64, guest: UInt64?)? in
            var last: (UInt64, UInt64, UInt64?)?
            while !Task.isCancelled {
                if let pid = backend.qemuPid(name: name),
                   let s = try? String(contentsOfFile: "/proc/\(pid)/smaps_rollup", encoding: .utf8),
                   let pss = Self.kib("Pss", in: s), let rss = Self.kib("Rss", in: s) {
                    last = (pss, rss, Self.guestRAMResident(pid: pid, size: spec.memory.kibibytes))
                }
                try? await Task.sleep(for: .milliseconds(200))
            }
            return last
        }
        let result = try await backend.run(spec)
        sampler.cancel()
        let mem = await sampler.value
        #expect(result.exitStatus == 3)
        #expect(result.output == "hello\n")
        #expect(result.bootSeconds != nil)
        #expect(result.console.contains("@@mvm:boot-complete"))
        let uptime = ConsoleParser.parse(result.console).bootUptime
        let overhead = mem.flatMap { m in m.guest.map { m.pss >= $0 ? (m.pss - $0) / 1024 : 0 } }
        print("hosted (libvirt embed, TCG on this host): launch→init \(result.bootSeconds.map { String(format: "%.2f", $0) } ?? "?") s wall, guest uptime at init \(uptime.map { String($0) } ?? "?") s, total \(String(format: "%.2f", result.totalSeconds)) s; QEMU for a 128 MiB guest: PSS \(mem.map { "\($0.pss / 1024) MiB" } ?? "?"), RSS \(mem.map { "\($0.rss / 1024) MiB" } ?? "?"), guest RAM touched \(mem?.guest.map { "\($0 / 1024) MiB" } ?? "?"), overhead (PSS minus guest RAM) \(overhead.map { "\($0) MiB" } ?? "?")")
        try Self.expectNothingLeft(name, backend: backend)
        #expect(try await backend.list().allSatisfy { $0.name != name })
    }

    /// The guest's virtio-net reaches the host end of a tap that the backend made, addressed on a
    /// /30 of its own, and the tap is gone after the run.
    @Test(.enabled(if: getuid() == 0 && FileManager.default.fileExists(atPath: "/dev/net/tun"), "needs root and /dev/net/tun for a tap"))
    func networkReachesTheHostOverATap() async throws {
        let backend = Self.backend()
        let name = "mvm-net-\(UUID().uuidString.prefix(6).lowercased())"
        let tap = "mvt" + HostLinks.interfaceTag(name)
        let spec = VMSpec(name: name, cpus: 1, memory: .mebibytes(128), net: NetSpec(tap: tap),
                          command: ["sh", "-c", "ip -o -4 addr show dev eth0; ping -c 2 -W 5 \"$MVM_HOST\" && echo reached $MVM_HOST"], timeout: 420)
        let result = try await backend.run(spec)
        #expect(result.exitStatus == 0, "console: \(result.console.suffix(1500))")
        let host = try #require(result.output.split(separator: "\n").first { $0.hasPrefix("reached ") }).dropFirst(8)
        #expect(host.hasPrefix("10.200."), "the host end is on an automatic /30: \(host)")
        #expect(result.output.contains("eth0"))
        #expect(result.output.contains("2 packets received"))
        #expect(!FileManager.default.fileExists(atPath: "/sys/class/net/" + tap), "the tap made for the run is removed")
        try Self.expectNothingLeft(name, backend: backend)
    }

    @Test func killingQEMUMidBootIsAClearError() async throws {
        let backend = Self.backend()
        let name = "mvm-kill-\(UUID().uuidString.prefix(6).lowercased())"
        let spec = VMSpec(name: name, memory: .mebibytes(128), command: ["true"], timeout: 300)
        let done = EventLog()
        let run = Task { defer { done.append(1) }; return try await backend.run(spec) }
        var killed = false
        let deadline = Date().addingTimeInterval(120)
        while Date() < deadline, done.events.isEmpty {
            // Mid-boot: libvirt has finished starting QEMU (the domain runs) and the init has not reported yet.
            if let pid = backend.qemuPid(name: name), try backend.connection().lookup(name: name)?.state() == .running {
                let console = try await backend.logs(name: name)
                #expect(!console.contains("@@mvm:end"), "the guest finished before it could be killed")
                // While it runs, ps and logs see it.
                #expect(try await backend.list().contains { $0.name == name && $0.pid == pid })
                #expect(kill(pid, SIGKILL) == 0)
                killed = true
                break
            }
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(killed, "QEMU never appeared")
        let outcome = await run.result
        switch outcome {
        case .success(let r): Issue.record("a killed guest returned a result: \(r.exitStatus)")
        case .failure(let e):
            let m = try #require(e as? MicroVMError)
            #expect(m.code == .guestError)
            #expect(m.message.contains("stopped before it reported a result"))
        }
        try Self.expectNothingLeft(name, backend: backend)
    }

    /// The slice as the host enforces it on QEMU: one CPU of work for the whole domain, and guest
    /// RAM plus QEMU's allowance as its memory limit (through libvirt's memtune, or written into
    /// libvirt's cgroup where libvirt may not set it), read from QEMU's cgroups while it runs.
    @Test func theSliceIsEnforcedOnQEMU() async throws {
        let backend = Self.backend()
        let name = "mvm-slice-\(UUID().uuidString.prefix(6).lowercased())"
        let spec = VMSpec(name: name, memory: .mebibytes(128), command: ["sleep", "120"],
                          slice: ResourceSlice(cpus: 1, placement: .shared, memory: .mebibytes(128)), timeout: 300)
        let done = EventLog()
        let run = Task { defer { done.append(1) }; return try await backend.run(spec) }
        let deadline = Date().addingTimeInterval(120)
        while Date() < deadline, done.events.isEmpty, backend.qemuPid(name: name) == nil { try await Task.sleep(for: .milliseconds(50)) }
        let pid = try #require(backend.qemuPid(name: name))
        // QEMU's pid file appears before libvirt moves it into the domain's cgroups, and the run
        // sets the limits once the domain is up: wait for the run to be past its spawn.
        var cgroupText = ""
        while Date() < deadline, done.events.isEmpty {
            cgroupText = (try? String(contentsOfFile: "/proc/\(pid)/cgroup", encoding: .utf8)) ?? ""
            if cgroupText.contains("memory:/machine"), (try? String(contentsOfFile: HostedRecord.file(name, in: backend.recordDirectory), encoding: .utf8))?.contains("\"machine\"") == true { break }
            try await Task.sleep(for: .milliseconds(100))
        }
        let cgroups = cgroupText.split(separator: "\n").map { $0.split(separator: ":", maxSplits: 2).map(String.init) }
        func dir(_ controller: String) -> String? {
            cgroups.first { $0.count == 3 && $0[1].split(separator: ",").contains(Substring(controller)) }.map { f in
                let p = f[2].components(separatedBy: "/emulator").first ?? f[2]
                return "/sys/fs/cgroup/\(controller)" + p
            }
        }
        if let mem = dir("memory"), let cpu = dir("cpu") {
            let limit = try String(contentsOfFile: mem + "/memory.limit_in_bytes", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(limit == "\((ByteCount.mebibytes(128) + Enforcement.overhead(for: .hosted)).bytes)", "memory limit \(limit) in \(mem)")
            let quota = try String(contentsOfFile: cpu + "/cpu.cfs_quota_us", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(quota == "100000", "cpu quota \(quota) in \(cpu)")
        } else {
            print("QEMU is in no v1 memory and cpu cgroup here (\(cgroups)); only the stop is checked")
        }
        try await backend.stop(name: name)
        _ = try? await run.value
        try Self.expectNothingLeft(name, backend: backend)
    }

    @Test func destroyingTheDomainFromStopIsAClearError() async throws {
        let backend = Self.backend()
        let name = "mvm-stop-\(UUID().uuidString.prefix(6).lowercased())"
        // A command that outlasts the stop: with `true` a fast boot could finish before it.
        let spec = VMSpec(name: name, memory: .mebibytes(128), command: ["sleep", "120"], timeout: 300)
        let done = EventLog()
        let run = Task { defer { done.append(1) }; return try await backend.run(spec) }
        let deadline = Date().addingTimeInterval(120)
        while Date() < deadline, done.events.isEmpty, backend.qemuPid(name: name) == nil { try await Task.sleep(for: .milliseconds(50)) }
        let stats = try backend.domainStats(name: name)
        #expect(stats.memory == .mebibytes(128))
        try await backend.stop(name: name)
        let e = await #expect(throws: MicroVMError.self) { try await run.value }
        #expect(e?.code == .guestError)
        try Self.expectNothingLeft(name, backend: backend)
    }
}
