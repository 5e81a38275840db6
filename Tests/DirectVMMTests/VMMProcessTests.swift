import Foundation
import Testing
import Host
import MicroVMCore
@testable import DirectVMM
@testable import VMM
import VMMAPI

/// `mvm-vmm` as a process, driven the way Firecracker's clients drive Firecracker: plain HTTP
/// over its unix socket, a whole lifecycle of a tiny guest on this host's KVM.
@Suite("mvm-vmm process", .serialized, .timeLimit(.minutes(3)))
struct VMMProcessTests {
    /// The one the direct backend starts (beside the test bundle in the build folder).
    static var binary: String? { VMMProcess.binary() }

    func scratch() throws -> String {
        let dir = "/tmp/mvm-vmm-test-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    func launch(_ args: [String], allowEmulated: Bool = true) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try #require(Self.binary, "mvm-vmm was not built (swift build --build-tests builds it)"))
        p.arguments = args
        var env = ProcessInfo.processInfo.environment
        env["MVM_DIRECT_ALLOW_EMULATED"] = allowEmulated ? "1" : nil
        p.environment = env
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        return p
    }

    func waitForExit(_ p: Process, seconds: Double) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while p.isRunning && Date() < deadline { usleep(10_000) }
        return !p.isRunning
    }

    @Test(.enabled(if: HostProfile.current().kvm.verdict != .absent, "no /dev/kvm"))
    func aWholeLifecycleOverTheAPISocket() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let kernel = dir + "/tiny.elf", disk = dir + "/disk.raw", sock = dir + "/api.sock", console = dir + "/console.log"
        try Data(TinyGuest.pvhELF()).write(to: URL(fileURLWithPath: kernel))
        try Data(count: 1 << 20).write(to: URL(fileURLWithPath: disk))
        let vmm = try launch(["--api-sock", sock, "--id", "tiny-1", "--console-log", console])
        defer { if vmm.isRunning { vmm.terminate() } }
        let api = UnixHTTPClient(path: sock)
        try api.waitUntilServing(seconds: 10)

        var r = try api.send("GET", "/")
        #expect(r.status == 200 && r.json["state"] as? String == "Not started" && r.json["id"] as? String == "tiny-1", "\(r.text)")
        r = try api.send("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 32}"#)
        #expect(r.status == 204, "\(r.text)")
        r = try api.send("PUT", "/boot-source", #"{"kernel_image_path": "\#(kernel)"}"#)
        #expect(r.status == 204, "\(r.text)")
        r = try api.send("PUT", "/drives/scratch", #"{"drive_id": "scratch", "path_on_host": "\#(disk)", "is_root_device": false, "is_read_only": true}"#)
        #expect(r.status == 204, "\(r.text)")
        r = try api.send("PUT", "/drives/other", #"{"drive_id": "scratch", "path_on_host": "\#(disk)", "is_root_device": false}"#)
        #expect(r.status == 400 && (r.json["fault_message"] as? String)?.isEmpty == false, "a drive id that differs from the path's: \(r.text)")
        r = try api.send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#)
        #expect(r.status == 204, "\(r.text)")
        r = try api.send("GET", "/")
        #expect(r.json["state"] as? String == "Running", "\(r.text)")
        r = try api.send("PUT", "/boot-source", #"{"kernel_image_path": "\#(kernel)"}"#)
        #expect(r.status == 400, "the boot source cannot change after the start: \(r.text)")

        r = try api.send("PATCH", "/vm", #"{"state": "Paused"}"#)
        #expect(r.status == 204, "\(r.text)")
        r = try api.send("GET", "/")
        #expect(r.json["state"] as? String == "Paused", "\(r.text)")
        // Paused vCPUs make no exits: the count stands still.
        let before = try api.send("GET", "/metrics").text
        usleep(200_000)
        let after = try api.send("GET", "/metrics").text
        #expect(before.contains("mvm_vmm_state 2") && Self.exits(before, "io_in") == Self.exits(after, "io_in"), "\(after)")
        r = try api.send("PATCH", "/vm", #"{"state": "Resumed"}"#)
        #expect(r.status == 204, "\(r.text)")
        usleep(100_000)
        #expect(try Self.exits(api.send("GET", "/metrics").text, "io_in") > Self.exits(after, "io_in"), "the guest polls again once resumed")

        r = try api.send("PUT", "/actions", #"{"action_type": "SendCtrlAltDel"}"#)
        #expect(r.status == 204, "\(r.text)")
        // The guest echoes the keys it reads, then resets through the i8042: the VMM exits 0.
        #expect(waitForExit(vmm, seconds: 20), "mvm-vmm did not exit after Ctrl-Alt-Del")
        #expect(vmm.terminationStatus == 0)
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: console)))
        #expect(bytes.first == UInt8(ascii: "K") && Array(bytes.dropFirst().prefix(4)) == [0x1d, 0x38, 0xe0, 0x53], "console: \(bytes)")
        #expect(!FileManager.default.fileExists(atPath: sock), "the API socket is removed at exit")
    }

    @Test(.enabled(if: HostProfile.current().kvm.verdict != .absent, "no /dev/kvm"))
    func aConfigFileBootsAtOnceAndSIGTERMStopsIt() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let kernel = dir + "/tiny.elf", config = dir + "/vm.json", console = dir + "/console.log"
        try Data(TinyGuest.pvhELF()).write(to: URL(fileURLWithPath: kernel))
        try Data(#"{"boot-source": {"kernel_image_path": "\#(kernel)"}, "machine-config": {"vcpu_count": 2, "mem_size_mib": 32}}"#.utf8)
            .write(to: URL(fileURLWithPath: config))
        let vmm = try launch(["--config-file", config, "--console-log", console])
        defer { if vmm.isRunning { vmm.terminate() } }
        let deadline = Date().addingTimeInterval(10)
        while (try? Data(contentsOf: URL(fileURLWithPath: console)))?.first != UInt8(ascii: "K"), Date() < deadline { usleep(10_000) }
        #expect(try Data(contentsOf: URL(fileURLWithPath: console)).first == UInt8(ascii: "K"), "the guest ran")
        vmm.terminate()
        #expect(waitForExit(vmm, seconds: 15))
        #expect(vmm.terminationReason == .exit && vmm.terminationStatus == 0)
    }

    /// `--attached` follows the parent process, not the thread that started it: the VMM outlives
    /// the end of the thread that spawned it, and ends when its parent process does.
    @Test(.enabled(if: HostProfile.current().kvm.verdict != .absent, "no /dev/kvm"))
    func anAttachedVMMEndsWithItsParentProcess() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let kernel = dir + "/tiny.elf", config = dir + "/vm.json", pidFile = dir + "/vmm.pid"
        try Data(TinyGuest.pvhELF()).write(to: URL(fileURLWithPath: kernel))
        try Data(#"{"boot-source": {"kernel_image_path": "\#(kernel)"}}"#.utf8).write(to: URL(fileURLWithPath: config))
        let attached = ["--config-file", config, "--console-log", "/dev/null", "--attached"]

        // Spawned by a thread that ends at once, in a process that goes on: the VMM goes on too.
        let spawned = DispatchSemaphore(value: 0)
        nonisolated(unsafe) var started: Result<Process, any Error>?
        Thread.detachNewThread { started = Result { try launch(attached) }; spawned.signal() }
        spawned.wait()
        let vmm = try #require(try started?.get())
        defer { if vmm.isRunning { vmm.terminate() } }
        usleep(1_000_000)
        #expect(vmm.isRunning, "the VMM ended with the thread that spawned it")

        // Spawned by a shell that lives 2 s (the VMM's parent, by construction): it ends with it.
        // Liveness is read from /proc, since an ended VMM stays a zombie until its new parent
        // reaps it.
        let parent = Process()
        parent.executableURL = URL(fileURLWithPath: "/bin/sh")
        parent.arguments = ["-c", "'\(try #require(Self.binary))' \(attached.map { "'\($0)'" }.joined(separator: " ")) & echo $! > '\(pidFile)'; sleep 2"]
        parent.environment = ProcessInfo.processInfo.environment.merging(["MVM_DIRECT_ALLOW_EMULATED": "1"]) { $1 }
        parent.standardError = FileHandle.nullDevice
        try parent.run()
        let deadline = Date().addingTimeInterval(5)
        while (try? String(contentsOfFile: pidFile, encoding: .utf8))?.hasSuffix("\n") != true, Date() < deadline { usleep(20_000) }
        let pid = try #require((try? String(contentsOfFile: pidFile, encoding: .utf8)).flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) })
        defer { if Self.isLive(pid) { kill(pid, SIGKILL) } }
        usleep(1_000_000)
        #expect(Self.isLive(pid), "the VMM runs while its parent does")
        // The shell's end is read from /proc too: Foundation learns of it only once every
        // holder of the descriptors it gave the shell has closed them, the VMM among them.
        let shellEnds = Date().addingTimeInterval(5)
        while Self.isLive(parent.processIdentifier), Date() < shellEnds { usleep(20_000) }
        let gone = Date().addingTimeInterval(5)
        while Self.isLive(pid), Date() < gone { usleep(20_000) }
        #expect(!Self.isLive(pid), "the VMM must end once its parent has")
    }

    /// Whether a process runs: it exists and is not a zombie.
    static func isLive(_ pid: pid_t) -> Bool {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return false }
        return stat[stat.index(after: close)...].trimmingCharacters(in: .whitespaces).first != "Z"
    }

    /// The VMM links FoundationEssentials at most: Foundation proper brings ICU and its data,
    /// which tripled the binary and the memory of each VMM. A dependency that pulls it back in
    /// shows here, in the libraries the (dynamically linked) test build names.
    @Test func theVMMLinksNoFoundationProper() throws {
        let binary = try #require(Self.binary, "mvm-vmm was not built (swift build --build-tests builds it)")
        let out = try ProcessRunner.run(["readelf", "-d", binary], timeout: 30, package: "binutils")
        let needed = out.stdoutText.split(separator: "\n").filter { $0.contains("(NEEDED)") }
        #expect(needed.contains { $0.contains("libc.so") }, "readelf listed no libraries: \(out.stdoutText.prefix(500))")
        for banned in ["libFoundation.so", "libFoundationInternationalization", "lib_FoundationICU", "libFoundationNetworking", "libFoundationXML"] {
            #expect(!needed.contains { $0.contains(banned) }, "mvm-vmm links \(banned)")
        }
    }

    @Test func badArgumentsAndAnEmulatedKVMAreRefusedWithAReason() throws {
        let bad = try launch(["--bogus"])
        #expect(waitForExit(bad, seconds: 10) && bad.terminationStatus == 2)
        let none = try launch([])
        #expect(waitForExit(none, seconds: 10) && none.terminationStatus == 2)
        // A machine the API would refuse is refused from a config file too, before anything is
        // allocated: an exit with a status, not a trap on the size arithmetic.
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Data(#"{"boot-source": {"kernel_image_path": "/nonexistent"}, "machine-config": {"vcpu_count": 1, "mem_size_mib": 9223372036854775807}}"#.utf8)
            .write(to: URL(fileURLWithPath: dir + "/huge.json"))
        let huge = try launch(["--config-file", dir + "/huge.json"])
        #expect(waitForExit(huge, seconds: 10) && huge.terminationReason == .exit && huge.terminationStatus == 2)
        if HostProfile.current().kvm.verdict == .emulated {
            let dir = try scratch()
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let refused = try launch(["--api-sock", dir + "/s"], allowEmulated: false)
            #expect(waitForExit(refused, seconds: 10) && refused.terminationStatus == 3)
            #expect(!FileManager.default.fileExists(atPath: dir + "/s"), "nothing served before the refusal")
        }
    }

    /// A FIFO named as a kernel or a drive would block the API's thread in open(2): refused first.
    @Test func aFIFOIsNotAKernelOrADrive() throws {
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let fifo = dir + "/fifo", kernel = dir + "/tiny.elf"
        #expect(mkfifo(fifo, 0o600) == 0)
        try Data(TinyGuest.pvhELF()).write(to: URL(fileURLWithPath: kernel))
        let asKernel = VMConfiguration(bootSource: BootSource(kernelImagePath: fifo))
        #expect(throws: MicroVMError.self) { try VMMBootPlan(asKernel, id: "t") }
        let asDrive = VMConfiguration(bootSource: BootSource(kernelImagePath: kernel), drives: [Drive(driveId: "d", pathOnHost: fifo)])
        let e = try #require(throws: MicroVMError.self) { try VMMBootPlan(asDrive, id: "t") }
        #expect(e.message.contains("regular file"), "\(e.message)")
        #expect(throws: Never.self) { try VMMBootPlan(VMConfiguration(bootSource: BootSource(kernelImagePath: kernel)), id: "t") }
    }

    static func exits(_ metrics: String, _ kind: String) -> Int {
        metrics.split(separator: "\n").first { $0.hasPrefix("mvm_vmm_exits_total{kind=\"\(kind)\"}") }
            .flatMap { Int($0.split(separator: " ").last ?? "") } ?? -1
    }
}

/// The tests' view of the API: the library's client, with the JSON decoded.
struct UnixHTTPClient {
    let path: String

    struct Response {
        var status: Int
        var text: String
        var json: [String: Any] {
            (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any] ?? [:]
        }
    }

    func waitUntilServing(seconds: Double) throws {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if (try? send("GET", "/version")) != nil { return }
            usleep(20_000)
        }
        throw MicroVMError(.timeout, "nothing served on \(path) within \(seconds) s")
    }

    func send(_ method: String, _ target: String, _ body: String? = nil) throws -> Response {
        let r = try APIClient(socketPath: path).send(method, target, body: body)
        return Response(status: r.status, text: r.body)
    }
}
