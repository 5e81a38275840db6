import Foundation
import Testing
import Allocator
import Containers
import DirectVMM
import Host
import Images
import VMM
@testable import Launch
import MicroVMCore
import ConfigFile

/// 200 launch/stop cycles through the one launch path, with real grants: 100 direct VMs (a tiny
/// guest that reports success, each in its own mvm-vmm with a tap) and 100 runc containers. The
/// host ends as it began — open descriptors, taps, cgroups, ledger rows — and the launching
/// process's memory stays flat.
@Suite("Soak", .serialized, .timeLimit(.minutes(10)))
struct SoakTests {
    static let canRun = getuid() == 0 && HostProfile.current().kvm.verdict != .absent && ProcessRunner.which("runc") != nil

    struct Census: Equatable, CustomStringConvertible {
        var descriptors: Int
        var taps: Int
        var cgroups: Int
        var grants: Int
        var description: String { "\(descriptors) fds, \(taps) taps, \(cgroups) cgroups, \(grants) grants" }
    }

    /// The soak's own resources only: other suites run beside it and make taps and cgroups of
    /// their own.
    static let links: Set<String> = Set((0..<105).flatMap { i in
        ["soak-vm-\(i)", "soak-c-\(i)"].flatMap { ["mvt" + HostLinks.interfaceTag($0), "mvc" + HostLinks.interfaceTag($0)] }
    })

    static func census(_ allocator: Allocator) throws -> Census {
        func count(_ dir: String, _ keep: (String) -> Bool = { _ in true }) -> Int {
            ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter(keep).count
        }
        // Every hierarchy's microvm/ subtree: one directory per live instance.
        let hierarchies = ((try? FileManager.default.contentsOfDirectory(atPath: "/sys/fs/cgroup")) ?? []).map { "/sys/fs/cgroup/" + $0 }
        let cgroups = (hierarchies + ["/sys/fs/cgroup"]).reduce(0) { n, h in
            n + count(h + "/microvm") { e in
                guard e.contains("soak-") else { return false }
                var isDir: ObjCBool = false
                return FileManager.default.fileExists(atPath: h + "/microvm/" + e, isDirectory: &isDir) && isDir.boolValue
            }
        }
        return Census(descriptors: count("/proc/self/fd"), taps: count("/sys/class/net") { links.contains($0) },
                      cgroups: cgroups, grants: try allocator.grants().count)
    }

    /// What this process's descriptors point at, for a failure's message.
    static func openDescriptors() -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []).sorted().map { fd in
            "\(fd)→" + ((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/" + fd)) ?? "?")
        }
    }

    static func residentBytes() -> UInt64 {
        let statm = (try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8)) ?? ""
        return (statm.split(separator: " ").dropFirst().first.flatMap { UInt64($0) } ?? 0) * UInt64(sysconf(Int32(_SC_PAGESIZE)))
    }

    @Test(.enabled(if: canRun, "needs root, /dev/kvm and runc"))
    func twoHundredLaunchesLeaveNothingBehind() async throws {
        let dir = FileManager.default.temporaryDirectory.path + "/mvm-soak-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let paths = Paths(state: dir + "/state", cache: Paths.default.cache)
        let kernel = dir + "/reports.elf"
        try Data(TinyGuest.pvhELF(code: TinyGuest.reportsSuccess)).write(to: URL(fileURLWithPath: kernel))
        let rootfs = try ImageStore().ensureDefault().rootfsTree
        let allocator = try Allocator.open(paths: paths, config: try MicroVMConfig.load())
        let launcher = InstanceLauncher(grants: AllocatorGrants(allocator: allocator),
                                        image: { BootArtifacts(kernel: kernel, rootfsTree: rootfs) }, paths: paths)
        let direct = DirectBackend(options: .init(allowEmulatedKVM: true, paths: paths, attachRootfs: false))
        let container = ContainerBackend(runtime: .runc, paths: paths)

        func cycle(_ i: Int) async throws {
            var vm = VMSpec(name: "soak-vm-\(i)", kernel: kernel, cpus: 1, memory: .mebibytes(64), command: ["true"], timeout: 30)
            vm.net = NetSpec()
            let v = try await launcher.launch(vm, on: direct)
            #expect(v.exitStatus == 0, "direct run \(i)")
            let c = try await launcher.launch(VMSpec(name: "soak-c-\(i)", cpus: 1, memory: .mebibytes(64), command: ["true"], rootfs: rootfs, timeout: 30),
                                              on: container)
            #expect(c.exitStatus == 0, "container run \(i)")
        }
        // Warm-up: caches, lazily opened descriptors (the ledger's), the runtime's first state.
        for i in 0..<5 { try await cycle(i) }
        let before = try Self.census(allocator), rss = Self.residentBytes()
        let started = Date()
        for i in 5..<105 { try await cycle(i) }
        let after = try Self.census(allocator), grown = Int64(Self.residentBytes()) - Int64(rss)
        print("soak: 200 launch/stop cycles in \(String(format: "%.1f", Date().timeIntervalSince(started))) s; before \(before), after \(after); resident memory grew \(grown >> 10) KiB")
        // Descriptors may differ by one or two in flight (a pidfd released a moment later);
        // one leaked per run would show as a hundred.
        #expect(after.descriptors <= before.descriptors + 2,
                "the cycles left descriptors open: before \(before), after \(after); open: \(Self.openDescriptors().suffix(20))")
        #expect(after.taps == before.taps && after.cgroups == before.cgroups && after.grants == before.grants,
                "the cycles left something behind: before \(before), after \(after)")
        #expect(grown < 16 << 20, "the launching process grew \(grown >> 20) MiB over 200 cycles")
        // Each ended direct run keeps its console log for `mvm logs`, up to the newest few.
        let logs = try FileManager.default.contentsOfDirectory(atPath: paths.instances).filter {
            FileManager.default.fileExists(atPath: paths.instances + "/" + $0 + "/console.log")
        }
        #expect(logs.count == DirectBackend.keptEndedRuns && logs.contains("soak-vm-104"), "\(logs.count) ended runs' logs kept: \(logs.sorted().suffix(5))")
    }
}
