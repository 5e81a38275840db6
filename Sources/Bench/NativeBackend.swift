import Foundation
import MicroVMCore
#if canImport(Glibc)
import Glibc
#endif

/// The benchmark baseline: the same command on the host itself, with no isolation, using the same
/// binaries as the instances (it chroots into the image's rootfs tree when the spec names one,
/// from a private mount namespace: the only isolation it has, and none that costs anything).
/// When the slice names host CPUs the process is pinned to them, so native and isolated runs
/// compete for the same CPUs.
public final class NativeBackend: InstanceBackend, @unchecked Sendable {
    public let mode = RunMode.native
    private let lock = NSLock()
    private var running: [String: (pid: Int32, started: Date, cpus: Int, memory: ByteCount)] = [:]

    public init() {}

    public func execute(_ plan: LaunchPlan) async throws -> RunResult {
        let spec = plan.spec
        var argv = spec.command
        if let root = plan.rootfsTree, root != "/" {
            guard FileManager.default.fileExists(atPath: root) else {
                throw MicroVMError.notFound("rootfs tree '\(root)' does not exist: build the image with `mvm image build`")
            }
            // A private mount namespace gives the chroot /dev, /proc and /sys (the tools need
            // them) without touching the shared tree; the mounts vanish with the process.
            let script = "mount --rbind /dev \"$0/dev\" && mount -t proc proc \"$0/proc\" && mount --rbind /sys \"$0/sys\" && exec chroot \"$0\" \"$@\""
            argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, root] + argv
        }
        // The baseline shares the host: only its CPUs are bounded (no cgroup, no quota), so
        // native and isolated runs compete for the same CPUs.
        if !plan.enforcement.cpuSet.isEmpty {
            argv = ["taskset", "-c", CPUList.format(plan.enforcement.cpuSet)] + argv
        }
        let name = spec.name
        let started = Date()
        let outcome = try await Self.spawn(argv, timeout: spec.timeout) { [weak self] pid in
            // A process has no boot: it is ready once it exists.
            plan.clock.mark(.spawned)
            plan.clock.mark(.firstInstruction)
            plan.clock.mark(.ready)
            self?.track(name, pid: pid, started: started, spec: spec)
        }
        untrack(name)
        if outcome.timedOut {
            throw MicroVMError(.timeout, "native run '\(name)' did not finish within \(Int(spec.timeout)) s and was killed")
        }
        return plan.result(status: outcome.status, output: outcome.output, console: outcome.output)
    }

    public func list() async throws -> [InstanceInfo] {
        return lock.withLock { running }.map { InstanceInfo(name: $0.key, mode: .native, state: "running", pid: $0.value.pid, cpus: $0.value.cpus, memory: $0.value.memory, startedAt: $0.value.started) }
    }

    public func stop(name: String) async throws {
        let pid = lock.withLock { running[name]?.pid }
        guard let pid else { throw MicroVMError.notFound("no native run named '\(name)'") }
        kill(pid, SIGTERM)
    }

    private func track(_ name: String, pid: Int32, started: Date, spec: VMSpec) {
        lock.withLock { running[name] = (pid, started, spec.cpus, spec.memory) }
    }

    private func untrack(_ name: String) { lock.withLock { running[name] = nil } }

    struct Outcome: Sendable { var status: Int32; var output: String; var timedOut: Bool }

    /// Runs argv on its own thread (not the cooperative pool, which is as wide as the CPUs: two
    /// blocking runs side by side would starve every other task), output and errors merged.
    static func spawn(_ argv: [String], timeout: Double, started: @escaping @Sendable (Int32) -> Void) async throws -> Outcome {
        let pipe = try ProcessRunner.makePipe()
        let child: ChildProcess
        do {
            child = try ChildProcess(argv, stdout: .descriptor(pipe.write), stderr: .descriptor(pipe.write))
        } catch {
            close(pipe.read); close(pipe.write)
            throw error
        }
        close(pipe.write)
        started(child.pid)
        return await withCheckedContinuation { cont in
            let thread = Thread {
                let box = OutputBox()
                let reader = DispatchGroup()
                reader.enter()
                DispatchQueue.global().async {
                    box.data = FileHandle(fileDescriptor: pipe.read, closeOnDealloc: true).readDataToEndOfFile()
                    reader.leave()
                }
                let (status, timedOut) = child.wait(timeout: timeout)
                // A background child that keeps the pipe open must not hang the run forever
                // (its reader is left to finish when that child exits).
                let complete = reader.wait(timeout: .now() + 5) == .success
                let output = complete ? String(decoding: box.data, as: UTF8.self) : "(output not collected: a background process kept it open)"
                cont.resume(returning: Outcome(status: status, output: output, timedOut: timedOut))
            }
            thread.start()
        }
    }
}

private final class OutputBox: @unchecked Sendable {
    private let lock = NSLock()
    private var stored = Data()
    var data: Data {
        get { lock.lock(); defer { lock.unlock() }; return stored }
        set { lock.lock(); stored = newValue; lock.unlock() }
    }
}
