import Foundation
import MicroVMCore
import Host
@testable import Bench

/// Test doubles and made-up reports.
enum Fixtures {
    static let slice = ResourceSlice(cpus: 1, placement: .pinned, memory: .mebibytes(512), pidsLimit: 1024)

    static func host(kvm: String = "emulated", runcUsable: Bool = true, libvirtUsable: Bool = true) throws -> HostProfile {
        let json = """
        {"bootID":"test","kernel":"6.1.0-test","cpuModel":"Test CPU","onlineCPUs":[0,1],"memoryTotal":"24G","memoryAvailable":"20G",
         "kvm":{"verdict":"\(kvm)","reason":"CPL0 loop 1600 ns/iteration"},"cgroupMode":"hybrid",
         "capabilities":{"runc":{"usable":\(runcUsable),"detail":"runc version 1.1.5","fix":"apt-get install runc"},
                         "docker":{"usable":false,"detail":"dockerd installed but not running","fix":"dockerd &"},
                         "libvirt-embed":{"usable":\(libvirtUsable),"detail":"qemu:///embed"},
                         "qemu":{"usable":true,"detail":"QEMU emulator version 7.2.19"}}}
        """
        return try JSONDecoder().decode(HostProfile.self, from: Data(json.utf8))
    }

    static let hostRecord = HostRecord(cpuModel: "Test CPU", cores: 2, kernel: "6.1.0-test", memory: .gibibytes(24), kvm: "emulated", kvmReason: "test", cgroupMode: "hybrid")

    static func report() -> BenchReport {
        let cpu = Metric("sysbench-cpu", "CPU throughput", unit: "events/s", higherIsBetter: true)
        func cell(_ backend: String, _ samples: [Double], status: Cell.Status = .ok, note: String? = nil) -> Cell {
            Cell(scenario: "cpu", metric: cpu.id, title: cpu.title, unit: cpu.unit, higherIsBetter: true, backend: backend,
                 status: status, note: note, samples: samples, details: samples.map { _ in [:] })
        }
        let cells = BenchRunner.withRatios([
            cell("native", [100, 102, 98]),
            cell("runc", [200, 204, 196]),
            cell("direct", [], status: .unavailable, note: "host KVM is emulated (test); run inside `mvm rig run`"),
        ])
        let config = RunConfigRecord(preset: "quick", repeats: 3, scenarios: ["cpu"], profile: "bench", slice: slice,
                                     workload: "test", guestKernel: nil, durations: BenchDurations.quick.asDictionary)
        return BenchReport(createdAt: Date(timeIntervalSince1970: 1_800_000_000), host: hostRecord, config: config, backends: [
            BackendRecord(name: "native", mode: .native, acceleration: "none", available: true),
            BackendRecord(name: "runc", mode: .container, acceleration: "none", available: true),
            BackendRecord(name: "direct", mode: .direct, acceleration: "emulated KVM", available: false, unavailableReason: "host KVM is emulated (test); run inside `mvm rig run`"),
        ], cells: cells)
    }
}

/// A backend that answers with canned tool output, for runner tests without real instances.
struct CannedBackend: InstanceBackend {
    let mode: RunMode
    let eventsPerSecond: Double
    var fail = false
    func execute(_ plan: LaunchPlan) async throws -> RunResult {
        if fail { throw MicroVMError(.backend, "canned failure") }
        let out = "    events per second:  \(eventsPerSecond)\n"
        plan.clock.mark(.ready)
        return plan.result(status: 0, output: out, console: out)
    }
}
