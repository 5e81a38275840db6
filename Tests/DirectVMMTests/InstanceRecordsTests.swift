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
