import Foundation
import Testing
import MicroVMCore
@testable import Allocator

/// The built `mvm` next to the test bundle.
private let mvmBinary: String? = {
    let dirs = [URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent(),
                URL(fileURLWithPath: Bundle.main.bundlePath).deletingLastPathComponent(),
                URL(fileURLWithPath: Bundle.main.bundlePath)]
    return dirs.map { $0.appendingPathComponent("mvm").path }.first { FileManager.default.isExecutableFile(atPath: $0) }
}()

/// Several real `mvm` processes allocate from one ledger at once.
@Suite(.serialized, .timeLimit(.minutes(5))) struct MultiProcessTests {
    @Test(.enabled(if: mvmBinary != nil, "the mvm executable is not next to the test bundle: build with swift build --build-tests"))
    func concurrentProcessesNeverDoubleGrant() throws {
        let root = Fixture.tempDir("mp")
        defer { try? FileManager.default.removeItem(atPath: root) }
        let roots = try Fixture.host(at: root + "/host", cores: (0..<4).map { [$0, $0 + 4] }, nodes: [[0, 1, 4, 5], [2, 3, 6, 7]], memTotalKB: 16 << 20)
        try Fixture.write(root + "/config.yaml", """
            reservation: {cpus: 0, memory: 1G, memoryOvercommit: 1.0}
            defaults: {profile: p}
            profiles: {p: {cpus: 1, memory: 64M, placement: shared}}
            """)
        func launch(_ args: [String]) throws -> (Process, Pipe) {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: mvmBinary!)
            p.arguments = ["alloc", "grant", "--host-root", root + "/host", "--config", root + "/config.yaml", "--pid", "\(getpid())", "--json"] + args
            var env = ProcessInfo.processInfo.environment
            env["MVM_STATE_DIR"] = root + "/state"
            p.environment = env
            let err = Pipe()
            p.standardError = err
            p.standardOutput = FileHandle.nullDevice
            try p.run()
            return (p, err)
        }
        // Round 1: 6 × 4G shared on 15G: 3 fit. Round 2: 6 × 2 dedicated CPUs on 8, of which the
        // shared pool keeps 1: 3 fit.
        for (args, expectGranted, refusal) in [(["--cpus", "1", "--memory", "4G", "--placement", "shared"], 3, "of memory"),
                                              (["--cpus", "2", "--memory", "256M", "--placement", "dedicated"], 3, "dedicated CPUs")] {
            let procs = try (0..<6).map { i in try launch(args + ["--owner", "p\(i)"]) }
            var granted = 0
            for (p, err) in procs {
                let text = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
                p.waitUntilExit()
                if p.terminationStatus == 0 { granted += 1 } else { #expect(text.contains(refusal), "\(text)") }
            }
            #expect(granted == expectGranted)
        }
        let capacity = try HostCapacity.probe(roots: roots, reservation: Fixture.reservation())
        let a = try Allocator(capacity: capacity, ledgerPath: root + "/state/ledger.sqlite")
        let grants = try a.grants()
        #expect(grants.count == 6)
        PropertyTests.check(grants, capacity)
        let dedicated = grants.filter { $0.slice.placement == .dedicated }.flatMap(\.slice.cpuSet)
        #expect(dedicated.count == 6 && Set(dedicated).count == 6)
        #expect(try a.events().filter { $0.kind == "grant" }.count == 6)
    }
}
