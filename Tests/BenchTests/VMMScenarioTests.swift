import Foundation
import Testing
import Host
import MicroVMCore
@testable import Bench

@Suite("vmm scenario", .serialized)
struct VMMScenarioTests {
    @Test func guestRAMIsLeftOutOfTheVMMsMemory() {
        let smaps = """
            55d0a0000000-55d0a0200000 r-xp 00000000 08:01 1234 /usr/bin/mvm-vmm
            Size:               2048 kB
            Rss:                1024 kB
            Pss:                 512 kB
            7f0000000000-7f0008000000 rw-p 00000000 00:00 0
            Size:             131072 kB
            Rss:                 100 kB
            Pss:                 100 kB
            7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
            Size:                132 kB
            Rss:                  16 kB
            Pss:                  16 kB
            """
        let m = VMMScenario.memoryExcludingGuestRAM(smaps, guestBytes: 128 << 20)
        #expect(m.pss == (512 + 16) * 1024)
        #expect(m.rss == (1024 + 16) * 1024)
    }

    /// Guest RAM split in two mappings (small pages for its first 2 MiB, huge pages above) is
    /// still guest RAM; an anonymous mapping beside it, or one of a size of its own, is not.
    @Test func guestRAMSplitInAdjacentMappingsIsLeftOut() {
        let smaps = """
            7efffff00000-7f0000000000 rw-p 00000000 00:00 0
            Size:               1024 kB
            Rss:                  40 kB
            Pss:                  40 kB
            7f0000000000-7f0000200000 rw-p 00000000 00:00 0
            Size:               2048 kB
            Rss:                  20 kB
            Pss:                  20 kB
            7f0000200000-7f0008000000 rw-p 00000000 00:00 0
            Size:             129024 kB
            Rss:                2048 kB
            Pss:                2048 kB
            7f0100000000-7f0108000001 rw-p 00000000 00:00 0
            Size:             131076 kB
            Rss:                   8 kB
            Pss:                   8 kB
            7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
            Size:                132 kB
            Rss:                  16 kB
            Pss:                  16 kB
            """
        let m = VMMScenario.memoryExcludingGuestRAM(smaps, guestBytes: 128 << 20)
        #expect(m.pss == (40 + 8 + 16) * 1024)
        #expect(m.rss == (40 + 8 + 16) * 1024)
    }

    /// The real VMMs on the host's KVM, whatever it is: mvm-vmm, the C floor and (where QEMU is
    /// installed) QEMU's microvm run the tiny guests to their end and report finite figures.
    @Test(.enabled(if: getuid() == 0 && HostProfile.current().kvm.verdict != .absent, "needs root and /dev/kvm"))
    func measuresTheVMMsOnTinyGuests() async throws {
        let ctx = BenchContext(workload: .host, slice: ResourceSlice(cpus: 1, memory: .mebibytes(128)), durations: .quick)
        let host = HostProfile.current()
        for name in ["direct", "qemu-microvm"] {
            if name == "qemu-microvm", ProcessRunner.which("qemu-system-x86_64") == nil {
                print("vmm scenario: qemu-system-x86_64 is not installed; the qemu-microvm half is not measured")
                continue
            }
            let target = BenchTarget(record: BackendRecord(name: name, mode: BackendCatalog.mode(of: name),
                                                           acceleration: BackendCatalog.acceleration(mode: .direct, kvm: host.kvm.verdict),
                                                           available: false), backend: nil)
            let out = try await VMMScenario().measure(target, ctx)
            func values(_ m: Metric) -> [Double] { out.filter { $0.metric == m && $0.unavailable == nil }.map(\.value) }
            #expect(values(VMMScenario.whole).count == VMMScenario.runs, "\(name)")
            #expect(values(VMMScenario.floor).count == VMMScenario.runs, "\(name)")
            #expect(values(VMMScenario.whole).allSatisfy { $0 > 0 && $0 < 60_000 }, "\(name)")
            let pss = values(VMMScenario.pss), many = values(VMMScenario.pssMany)
            #expect(pss.count == 1 && pss[0] > 0.1 && pss[0] < 512, "\(name): \(pss)")
            #expect(many.count == 1 && many[0] > 0.1 && many[0] < 512, "\(name): \(many)")
            if name == "direct" {
                let first = values(VMMScenario.firstRun)
                #expect(first.count == VMMScenario.runs && zip(first, values(VMMScenario.whole)).allSatisfy { $0 < $1 })
                // The whole `mvm run` a user types holds the VMM's whole life and more.
                let run = values(VMMScenario.mvmRun)
                #expect(run.count == VMMScenario.runs, "\(out.filter { $0.metric == VMMScenario.mvmRun })")
                #expect(run.sorted()[VMMScenario.runs / 2] > values(VMMScenario.whole).sorted()[VMMScenario.runs / 2])
                let left = (try? FileManager.default.contentsOfDirectory(atPath: Paths.default.instances)) ?? []
                #expect(!left.contains { $0.hasPrefix("bench-vmm-run-\(getpid())-") }, "the bench's runs left their instance directories")
            }
            print("vmm scenario on \(name): whole \(values(VMMScenario.whole).sorted()[VMMScenario.runs / 2]) ms, floor \(values(VMMScenario.floor).sorted()[VMMScenario.runs / 2]) ms, PSS \(pss) MiB, with \(VMMScenario.manyVMMs) running \(many) MiB each")
        }
        // Nothing left behind: no VMM and no bench tap.
        let taps = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/class/net")) ?? []
        #expect(!taps.contains { $0.hasPrefix("mvt") && $0.contains("bench-vmm") })
    }

    @Test func runsOnlyOnVMMs() async throws {
        let ctx = BenchContext(workload: .host, slice: ResourceSlice(cpus: 1, memory: .mebibytes(128)), durations: .quick)
        let target = BenchTarget(record: BackendRecord(name: "runc", mode: .container, acceleration: "none", available: true), backend: nil)
        await #expect(throws: ScenarioUnavailable.self) { _ = try await VMMScenario().measure(target, ctx) }
        #expect(!VMMScenario().needsBackend && StartLatency().needsBackend)
    }
}
