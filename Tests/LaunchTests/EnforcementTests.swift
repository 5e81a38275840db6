import Foundation
import Testing
import Allocator
@testable import Containers
@testable import DirectVMM
@testable import VMM
@testable import Libvirt
import MicroVMCore

/// One enforcement, four renderings: for every placement, the cgroup files of the direct VMM, the
/// OCI `linux.resources` of runc/crun/runsc, Docker's flags and libvirt's XML must mean the same
/// CPUs of work, the same CPUs, the same memory (by the overhead rule) and the same pids limit.
@Suite struct EnforcementRenderingTests {
    /// What a rendering means, read back from the rendering itself.
    struct Meaning: Equatable, CustomStringConvertible {
        var cpusOfWork: Double
        var cpuSet: [Int]
        var memoryLimit: UInt64
        var pids: Int?
        var description: String { "\(cpusOfWork) CPUs of work on \(cpuSet), \(memoryLimit >> 20) MiB, pids \(pids.map(String.init) ?? "-")" }
    }

    static let slices: [ResourceSlice] = [
        ResourceSlice(cpus: 1, placement: .shared, cpuSet: [0, 1], memory: .mebibytes(256), pidsLimit: 512),
        ResourceSlice(cpus: 2, placement: .shared, cpuSet: [0, 1, 2, 3], cpuWeight: 300, memory: .mebibytes(512)),
        ResourceSlice(cpus: 1, placement: .pinned, cpuSet: [1], memory: .mebibytes(512), pidsLimit: 1024),
        ResourceSlice(cpus: 2, placement: .dedicated, cpuSet: [2, 3], memory: .gibibytes(1), pidsLimit: 64),
        ResourceSlice(cpus: 2, placement: .shared, cpuSet: [0, 1], cpuQuota: 0.5, memory: .mebibytes(128)),
    ]

    static func oci(_ e: Enforcement) throws -> Meaning {
        let r = OCIResources(enforcement: e)
        let quota = try #require(r.cpu.quota), period = try #require(r.cpu.period)
        return Meaning(cpusOfWork: Double(quota) / Double(period), cpuSet: try CPUList.parse(r.cpu.cpus ?? ""),
                       memoryLimit: UInt64(try #require(r.memory.limit)), pids: r.pids.map { Int($0.limit) })
    }

    static func docker(_ e: Enforcement) throws -> Meaning {
        let f = DockerDriver.resourceFlags(e)
        func value(_ flag: String) -> String? { f.firstIndex(of: flag).map { f[$0 + 1] } }
        let quota = try #require(value("--cpu-quota").flatMap(Double.init)), period = try #require(value("--cpu-period").flatMap(Double.init))
        #expect(value("--memory") == value("--memory-swap"), "Docker must not allow swap beyond the limit")
        return Meaning(cpusOfWork: quota / period, cpuSet: try CPUList.parse(value("--cpuset-cpus") ?? ""),
                       memoryLimit: try #require(value("--memory").flatMap { UInt64($0.dropLast()) }), pids: value("--pids-limit").flatMap(Int.init))
    }

    static func cgroup(_ e: Enforcement) throws -> Meaning {
        let s = e.cgroupSlice
        let quota = try #require(s.cpuQuota)
        return Meaning(cpusOfWork: Double(CgroupSet.quotaMicros(quota)) / Double(Enforcement.period), cpuSet: s.cpuSet,
                       memoryLimit: s.memory.bytes, pids: s.pidsLimit)
    }

    static func libvirt(_ e: Enforcement, vcpus: Int) throws -> (Meaning, pins: [String]) {
        let c = DomainConfig(name: "t", memory: e.memory, vcpus: vcpus, accelerator: .qemu, kernel: "/k", cmdline: "x",
                             consoleLog: "/c", enforcement: e, memoryHardLimit: true)
        let xml = try DomainXML.document(for: c)
        func tag(_ t: String) -> String? {
            guard let a = xml.range(of: "<\(t)"), let gt = xml[a.upperBound...].firstIndex(of: ">"),
                  let b = xml.range(of: "</\(t)>", range: gt..<xml.endIndex) else { return nil }
            return String(xml[xml.index(after: gt)..<b.lowerBound])
        }
        let quota = try #require(tag("global_quota").flatMap(Double.init)), period = try #require(tag("global_period").flatMap(Double.init))
        let emulator = xml.range(of: "<emulatorpin cpuset='").map { r in String(xml[r.upperBound...].prefix { $0 != "'" }) } ?? ""
        let pins = xml.components(separatedBy: "<vcpupin ").dropFirst().compactMap { part in
            part.range(of: "cpuset='").map { r in String(part[r.upperBound...].prefix { $0 != "'" }) }
        }
        let kib = try #require(tag("hard_limit").flatMap(UInt64.init))
        // libvirt has no pids limit of its own: QEMU's threads are bounded by the cgroup libvirt makes.
        return (Meaning(cpusOfWork: quota / period, cpuSet: try CPUList.parse(emulator), memoryLimit: kib << 10, pids: e.pidsLimit), pins)
    }

    @Test(arguments: slices)
    func everyRenderingMeansTheSameSlice(slice: ResourceSlice) throws {
        let cap = min(Double(slice.cpus), slice.cpuQuota ?? Double(slice.cpus))
        for mode in [RunMode.container, .direct, .hosted] {
            let e = Enforcement(slice: slice, mode: mode)
            let expected = Meaning(cpusOfWork: cap, cpuSet: slice.cpuSet.sorted(), memoryLimit: (slice.memory + Enforcement.overhead(for: mode)).bytes,
                                   pids: slice.pidsLimit)
            switch mode {
            case .container:
                #expect(try Self.oci(e) == expected, "OCI (\(slice.placement))")
                #expect(try Self.docker(e) == expected, "Docker (\(slice.placement))")
            case .direct:
                #expect(try Self.cgroup(e) == expected, "cgroup (\(slice.placement))")
                let m = MachineConfiguration(enforcement: e)
                #expect(m.memory == slice.memory && m.cpus == slice.cpus)
                #expect(m.vcpuPins == e.vcpuPins)
            case .hosted:
                let (meaning, pins) = try Self.libvirt(e, vcpus: slice.cpus)
                #expect(meaning == expected, "libvirt (\(slice.placement))")
                #expect(pins == e.vcpuPins.map(CPUList.format))
            default: break
            }
        }
    }

    @Test func placementDecidesThePins() {
        let shared = Enforcement(slice: ResourceSlice(cpus: 2, placement: .shared, cpuSet: [0, 1, 2], memory: .mebibytes(64)), mode: .direct)
        #expect(shared.vcpuPins == [[0, 1, 2], [0, 1, 2]])
        #expect(shared.cpuQuota == 2)
        let dedicated = Enforcement(slice: ResourceSlice(cpus: 2, placement: .dedicated, cpuSet: [3, 2], memory: .mebibytes(64)), mode: .direct)
        #expect(dedicated.vcpuPins == [[2], [3]])
        // A quota above the CPU count is capped: N CPUs are at most N CPUs of work.
        let over = Enforcement(slice: ResourceSlice(cpus: 1, cpuQuota: 4, memory: .mebibytes(64)), mode: .container)
        #expect(over.cpuQuota == 1)
        #expect(Enforcement.overhead(for: .container) == ByteCount(0))
        #expect(Enforcement.overhead(for: .direct) < Enforcement.overhead(for: .hosted))
    }
}

extension ResourceSlice: CustomTestStringConvertible {
    public var testDescription: String { "\(cpus) CPU \(placement.rawValue) on \(cpuSetList)" }
}
