import Foundation
import Testing
import MicroVM

/// `mvm run --image`: one image tarball in every mode, as the container's root or the VM's root
/// disk, with its entrypoint, command, environment and working directory as the defaults.
@Suite("mvm run --image", .serialized, .timeLimit(.minutes(5)))
struct ImageRunCLITests {
    /// An image whose entrypoint is `sh -c`, whose command prints its environment's greeting and
    /// where it runs, from a working directory of its own.
    /// The image's name: its own, so loading it into Docker or containerd replaces no one's busybox.
    static let tag = "mvm-test-busybox:latest"

    static let image: Result<String, any Error> = Result {
        // One path for every run, replaced whole: the same bytes each time, and none left per run.
        let path = NSTemporaryDirectory() + "mvm-cli-busybox.tar"
        let part = path + ".\(getpid())"
        guard let busybox = ProcessRunner.which("busybox") else { throw MicroVMError.notFound("busybox is not installed") }
        defer { unlink(part) }
        try BusyboxImage.make(at: part, tag: tag, config: ImageConfig(entrypoint: ["/bin/sh", "-c"], cmd: ["echo \"$GREETING from $(pwd)\""],
                                                            env: ["PATH=/bin", "GREETING=hello"], workingDir: "/srv"),
                              directories: ["/srv"], busybox: busybox)
        guard rename(part, path) == 0 else { throw MicroVMError(.internalError, "cannot rename \(part) to \(path): \(String(cString: strerror(errno)))") }
        return path
    }

    func runs(_ mode: [String], timeout: Double = 120) throws {
        let image = try Self.image.get()
        let (env, dir) = try KillSafetyCLITests.stateDirectory()
        defer { KillSafetyCLITests.removeStateDirectory(dir) }
        let defaults = try MVM.run(["run"] + mode + ["--image", image], environment: env, timeout: timeout)
        #expect(defaults.status == 0 && defaults.stdoutText == "hello from /srv\n", "\(defaults.stdoutText)\(defaults.stderrText.suffix(800))")
        // Arguments replace the image's command and keep its entrypoint (sh -c).
        let args = try MVM.run(["run"] + mode + ["--image", image, "--", "echo $GREETING again; exit 7"], environment: env, timeout: timeout)
        #expect(args.status == 7 && args.stdoutText == "hello again\n", "\(args.stdoutText)\(args.stderrText.suffix(800))")
        #expect(try MVM.run(["alloc", "show"], environment: env).stdoutText.contains("grants      0"))
    }

    @Test(.enabled(if: KillSafetyCLITests.canRunContainers, "needs root and runc"))
    func inARuncContainer() throws { try runs(["--mode", "container", "--runtime", "runc"]) }

    @Test(.enabled(if: KillAtPhaseCLITests.usable(.docker), "needs root and a running Docker engine"))
    func inADockerContainer() throws { try runs(["--mode", "container", "--runtime", "docker"]) }

    @Test(.enabled(if: KillSafetyCLITests.canRunHosted, "needs root and libvirt's embedded QEMU driver"))
    func inAHostedVM() throws { try runs(["--mode", "hosted"], timeout: 240) }

    /// `mvm bench --image`: every scenario runs on the image's rootfs; one whose programs the
    /// image lacks (busybox has no sysbench) reads unavailable and names them; the containerd
    /// scenario runs the same tree through containerd's runc shim.
    @Test(.enabled(if: KillSafetyCLITests.canRunContainers && ProcessRunner.which("containerd") != nil && ProcessRunner.which("ctr") != nil,
                   "needs root, runc, containerd and ctr"))
    func benchRunsEveryScenarioOnTheImage() throws {
        let image = try Self.image.get()
        let (env, dir) = try KillSafetyCLITests.stateDirectory()
        defer { KillSafetyCLITests.removeStateDirectory(dir) }
        let r = try MVM.run(["bench", "--image", image, "--backends", "native,runc", "--scenarios", "start,cpu,containerd", "--repeat", "1",
                             "--out", dir + "/bench", "--json"], environment: env, timeout: 600)
        #expect(r.status == 0, "\(r.stderrText.suffix(2000))")
        let report = try #require(try JSONSerialization.jsonObject(with: Data(r.stdoutText.utf8)) as? [String: Any], "\(r.stdoutText.prefix(500))")
        let cells = report["cells"] as? [[String: Any]] ?? []
        func cell(_ metric: String, _ backend: String) -> [String: Any]? { cells.first { $0["metric"] as? String == metric && $0["backend"] as? String == backend } }
        for backend in ["native", "runc"] {
            #expect(cell("start-serial", backend)?["status"] as? String == "ok", "\(backend): \(cell("start-serial", backend) ?? [:])")
            let cpu = cell("sysbench-cpu", backend)
            #expect(cpu?["status"] as? String == "unavailable" && (cpu?["note"] as? String ?? "").contains("has no sysbench"), "\(cpu ?? [:])")
        }
        #expect(cell("containerd-start-exit", "runc")?["status"] as? String == "ok", "\(cell("containerd-start-exit", "runc") ?? [:])")
        let nativeNote = cell("containerd-idle-pss", "native")?["note"] as? String ?? ""
        #expect(nativeNote.contains("runs on runc, runsc"), "\(nativeNote)")
        let workload = (report["config"] as? [String: Any])?["workload"] as? String ?? ""
        #expect(workload.contains("image mvm-cli-busybox.tar"), "\(report["config"] ?? "")")
        #expect(try MVM.run(["alloc", "show"], environment: env).stdoutText.contains("grants      0"))
    }

    /// A missing tarball, a file that is no image, and --no-rootfs beside --image are refused
    /// before anything is granted.
    @Test func badImagesAreRefusedBeforeAnythingIsGranted() throws {
        let (env, dir) = try KillSafetyCLITests.stateDirectory()
        defer { KillSafetyCLITests.removeStateDirectory(dir) }
        let missing = try MVM.run(["run", "--mode", "container", "--image", dir + "/none.tar", "--", "true"], environment: env)
        #expect(missing.status != 0 && missing.stderrText.contains("does not exist"), "\(missing.stderrText)")
        try "not a tarball".write(toFile: dir + "/junk.tar", atomically: true, encoding: .utf8)
        let junk = try MVM.run(["run", "--mode", "container", "--image", dir + "/junk.tar", "--", "true"], environment: env)
        #expect(junk.status != 0 && junk.stderrText.contains("tar"), "\(junk.stderrText)")
        let both = try MVM.run(["run", "--mode", "hosted", "--no-rootfs", "--image", dir + "/junk.tar"], environment: env)
        #expect(both.status == 2 && both.stderrText.contains("--no-rootfs"), "\(both.stderrText)")
        let ledger = FileManager.default.fileExists(atPath: dir + "/state/ledger.sqlite")
        #expect(try !ledger || MVM.run(["alloc", "show"], environment: env).stdoutText.contains("grants      0"))
    }
}
