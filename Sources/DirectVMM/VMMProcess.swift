import Foundation
import LinuxBoot
import MicroVMCore
import Synchronization
import VMM
import VMMAPI

/// A direct VM in a process of its own: `mvm run` starts `mvm-vmm` with the launch plan as a
/// Firecracker configuration document, as a jailer starts Firecracker. The VMM inherits the
/// run's cgroup (the slice's enforcement), dies with `mvm run` (parent-death signal), serves the
/// API on the instance's socket (`mvm pause`, `resume`, `stats`), writes the console to the
/// instance's log and, at exit, its milestones on the host's monotonic clock.
enum VMMProcess {
    /// `mvm-vmm` beside the running executable, else `MVM_VMM`, else the package's build folders.
    static func binary() -> String? {
        if let env = ProcessInfo.processInfo.environment["MVM_VMM"] { return FileManager.default.isExecutableFile(atPath: env) ? env : nil }
        var candidates: [String] = []
        if let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe") {
            candidates.append((exe as NSString).deletingLastPathComponent + "/mvm-vmm")
        }
        let src = Paths.sourceDirectory()
        candidates += [src + "/.build/release/mvm-vmm", src + "/.build/debug/mvm-vmm"]
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// The plan as `mvm-vmm` reads it. The command line is the plan's; the VMM adds its devices'.
    static func configuration(_ plan: LaunchPlan, kernel: String, tap: String?) -> VMConfiguration {
        let spec = plan.spec
        var c = VMConfiguration()
        c.machineConfig = MachineConfig(vcpuCount: spec.cpus, memSizeMib: Int(spec.memory.bytes >> 20),
                                        hugePages: plan.enforcement.hugePages ? "2M" : nil)
        c.bootSource = BootSource(kernelImagePath: kernel, initrdPath: plan.initrd, bootArgs: plan.cmdline)
        c.drives = plan.disks.enumerated().map { i, d in Drive(driveId: "disk\(i)", pathOnHost: d.path, isReadOnly: d.readOnly) }
        if let tap { c.networkInterfaces = [NetworkInterface(ifaceId: "eth0", hostDevName: tap)] }
        if let cid = spec.vsockCID { c.vsock = Vsock(guestCid: cid, udsPath: "") }
        c.vcpuPins = plan.enforcement.vcpuPins.isEmpty ? nil : plan.enforcement.vcpuPins
        return c
    }

    struct Outcome {
        var status: Int32
        /// The run outlived its time and was stopped.
        var timedOut: Bool
        var stderr: String
        var milestones: [String: Double]
    }

    /// Runs the VMM to its end: stops it (SIGTERM, then SIGKILL after 10 s) on `timeout` or when
    /// the task is cancelled. `started` gets its pid once it runs.
    static func run(binary: String, configuration: VMConfiguration, directory: String, name: String, logPath: String,
                    apiSocket: String, allowEmulatedKVM: Bool, timeout: Double,
                    started: @Sendable (Int32) -> Void) async throws -> Outcome {
        let configFile = directory + "/vmm.json", timings = directory + "/vmm-timings.json"
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys]
        try Paths.writeScratch(try enc.encode(configuration), to: configFile)
        defer { unlink(configFile); unlink(timings) }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = ["--config-file", configFile, "--api-sock", apiSocket, "--id", name, "--console-log", logPath,
                       "--timings-file", timings, "--attached"]
        var env = ProcessInfo.processInfo.environment
        env["MVM_DIRECT_ALLOW_EMULATED"] = allowEmulatedKVM ? "1" : nil
        p.environment = env
        p.standardInput = FileHandle.nullDevice
        p.standardOutput = FileHandle.nullDevice
        let err = Pipe()
        p.standardError = err
        let errors = Mutex(Data())
        err.fileHandleForReading.readabilityHandler = { h in
            let d = h.availableData
            errors.withLock { if $0.count < 64 << 10 { $0.append(d) } }
        }
        // Set before the start, so an exit at any moment is seen.
        let exit = Mutex<(done: Bool, waiter: CheckedContinuation<Void, Never>?)>((false, nil))
        p.terminationHandler = { _ in
            exit.withLock { e -> CheckedContinuation<Void, Never>? in e.done = true; defer { e.waiter = nil }; return e.waiter }?.resume()
        }
        do { try p.run() } catch {
            throw MicroVMError(.backend, "cannot start \(binary): \(error)")
        }
        started(p.processIdentifier)
        let pid = p.processIdentifier
        let stop: @Sendable () -> Void = {
            kill(pid, SIGTERM)
            DispatchQueue.global().asyncAfter(deadline: .now() + 10) { if p.isRunning { kill(pid, SIGKILL) } }
        }
        let timedOut = Atomic<Bool>(false)
        let timer = DispatchSource.makeTimerSource(queue: .global())
        timer.schedule(deadline: .now() + timeout)
        timer.setEventHandler { timedOut.store(true, ordering: .relaxed); stop() }
        timer.resume()
        defer { timer.cancel() }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                let done = exit.withLock { e -> Bool in
                    if !e.done { e.waiter = c }
                    return e.done
                }
                if done { c.resume() }
            }
        } onCancel: {
            stop()
        }
        err.fileHandleForReading.readabilityHandler = nil
        let rest = (try? err.fileHandleForReading.readToEnd()) ?? Data()
        let text = String(decoding: errors.withLock { $0 } + rest, as: UTF8.self)
        let milestones = FileManager.default.contents(atPath: timings).flatMap { try? JSONDecoder().decode([String: Double].self, from: $0) } ?? [:]
        let status = p.terminationReason == .uncaughtSignal ? 128 + p.terminationStatus : p.terminationStatus
        return Outcome(status: status, timedOut: timedOut.load(ordering: .relaxed), stderr: text, milestones: milestones)
    }
}
