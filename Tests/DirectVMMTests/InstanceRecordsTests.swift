import Foundation
import Testing
import Host
import MicroVMCore
@testable import DirectVMM
@testable import VMM

/// `mvm ps`, `stop` and `logs` for direct instances: a record names the process that runs the
/// VMM, and is believed only while that process (pid and start time) lives.
@Suite("Direct instance records", .serialized)
struct InstanceRecordsTests {
    func record(_ name: String, pid: Int32, paths: Paths) -> DirectInstanceRecord {
        DirectInstanceRecord(name: name, pid: pid, pidStart: ProcessIdentity.startTime(pid: pid), cpus: 1, memory: .mebibytes(64),
                             startedAt: Date(), logPath: paths.instances + "/" + name + "/console.log")
    }

    /// Each run's end keeps the console logs of the newest ended runs for `mvm logs` and removes
    /// older ones; a live instance's directory and the backends' own directories stay.
    @Test func endedRunsKeepTheNewestLogsAndNoMore() async throws {
        let paths = try tempPaths()
        defer { try? FileManager.default.removeItem(atPath: paths.state) }
        let records = InstanceRecords(directory: paths.instances + "/direct")
        let live = try records.claim(record("live-one", pid: getpid(), paths: paths))
        try Data("up\n".utf8).write(to: URL(fileURLWithPath: live))
        try FileManager.default.createDirectory(atPath: paths.instances + "/detached", withIntermediateDirectories: true)
        let backend = DirectBackend(options: .init(paths: paths))
        func written(_ path: String, at seconds: Int) { var t = utimbuf(actime: seconds, modtime: seconds); utime(path, &t) }
        // Ten ended runs, the oldest first; the live one's log is older than all of them.
        written(live, at: 1_000)
        for i in 0..<10 {
            let dir = paths.instances + "/ended-\(i)"
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            try Data("run \(i)\n".utf8).write(to: URL(fileURLWithPath: dir + "/console.log"))
            written(dir + "/console.log", at: 2_000 + i)
        }
        backend.pruneEndedRuns(keep: 4)
        let left = Set(try FileManager.default.contentsOfDirectory(atPath: paths.instances))
        #expect(left == ["direct", "detached", "live-one", "ended-6", "ended-7", "ended-8", "ended-9"], "\(left.sorted())")
        #expect(try await backend.logs(name: "ended-9") == "run 9\n")
        await #expect(throws: MicroVMError.self) { _ = try await backend.logs(name: "ended-5") }
    }

    @Test func aLiveInstanceIsListedStoppedAndItsLogRead() async throws {
        let paths = try tempPaths()
        defer { try? FileManager.default.removeItem(atPath: paths.state) }
        // A process standing in for an `mvm run` that holds a VM: stop must end it.
        let child = try ChildProcess(["sleep", "60"])
        let records = InstanceRecords(directory: paths.instances + "/direct")
        var r = record("vm-a", pid: child.pid, paths: paths)
        let log = try records.claim(r)
        try Data("@@mvm:boot-complete@@\n".utf8).write(to: URL(fileURLWithPath: log))
        let backend = DirectBackend(options: .init(paths: paths))

        // Until its VMM runs, the instance is starting and has no process of its own to show.
        var listed = try await backend.list()
        #expect(listed.map(\.name) == ["vm-a"] && listed.first?.state == "starting" && listed.first?.pid == nil)
        r.vmmPID = 4_000_000
        try records.update(r)
        listed = try await backend.list()
        #expect(listed.map(\.name) == ["vm-a"] && listed.first?.state == "running" && listed.first?.pid == 4_000_000 && listed.first?.mode == .direct)
        #expect(try await backend.logs(name: "vm-a").contains("boot-complete"))
        // The same name cannot be claimed while its process lives.
        #expect(throws: MicroVMError.self) { try records.claim(record("vm-a", pid: getpid(), paths: paths)) }

        try await backend.stop(name: "vm-a")
        #expect(child.wait(timeout: 5).status != 0)
        #expect(try await backend.list().isEmpty)
        await #expect(throws: MicroVMError.self) { try await backend.stop(name: "vm-a") }
    }

    @Test func aRecordWhoseProcessIsGoneIsDropped() async throws {
        let paths = try tempPaths()
        defer { try? FileManager.default.removeItem(atPath: paths.state) }
        let child = try ChildProcess(["true"])
        _ = child.wait(timeout: 5)
        let records = InstanceRecords(directory: paths.instances + "/direct")
        _ = try records.claim(record("gone", pid: child.pid, paths: paths))
        #expect(try await DirectBackend(options: .init(paths: paths)).list().isEmpty)
        #expect(!FileManager.default.fileExists(atPath: records.file("gone")))
    }
}
