import Allocator
import Host
import Foundation
import MicroVMCore

/// A direct-mode instance as `mvm ps`, `stop` and `logs` find it: the process that runs its VMM
/// (pid and start time, so a reused pid is not mistaken for it) and its console log.
public struct DirectInstanceRecord: Codable, Sendable, Equatable {
    public var name: String
    public var pid: Int32
    public var pidStart: UInt64?
    public var cpus: Int
    public var memory: ByteCount
    public var startedAt: Date
    public var logPath: String
    /// The `mvm-vmm` process that runs the VM, once started.
    public var vmmPID: Int32?
    /// Its start time, so a reused pid is never taken for it.
    public var vmmStart: UInt64?
    /// Its API socket (Firecracker-compatible): `mvm pause`, `resume` and `stats` talk to it.
    public var apiSocket: String?
    /// Whether the VMM runs in its jail (false: `--no-jail`).
    public var jailed: Bool?
    /// The guest's vsock CID, and whether its init serves the shell `mvm exec` uses.
    public var vsockCID: UInt32?
    public var vsockShell: Bool?
    /// Host resources the run makes, recorded before they are made: whoever finds the record
    /// stale (its run was killed) removes them. The tap the run creates, and its cgroup's name.
    public var tap: String?
    public var cgroup: String?
    /// The guest's memory at launch, when it has a balloon: `memory` is then what the balloon
    /// leaves it (`mvm update --memory`), at most this.
    public var bootMemory: ByteCount?
    /// The process in `pid` holds other instances too (the bench runs its VMs in its own
    /// process): `mvm stop` then stops this one through its VMM, never by signalling the holder.
    public var sharedHolder: Bool?
}

/// One JSON file per running direct instance. A record whose process is gone is stale and is
/// removed when seen; a name held by a live process cannot be claimed again.
struct InstanceRecords: Sendable {
    var directory: String

    func file(_ name: String) -> String { directory + "/" + name + ".json" }

    /// Writes the record (its log's directory too) and returns the log path. The record is
    /// created exclusively: a name a live instance holds cannot be claimed again, by this process
    /// or another; a stale record (its process gone) is replaced.
    func claim(_ record: DirectInstanceRecord) throws -> String {
        try Paths.ensureDirectory(directory)
        try Paths.ensureDirectory((record.logPath as NSString).deletingLastPathComponent)
        let data = try JSONEncoder.iso8601.encode(record)
        for _ in 0..<2 {
            let fd = open(file(record.name), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
            if fd >= 0 {
                defer { close(fd) }
                let n = data.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                guard n == data.count else { release(record.name, owner: record); throw MicroVMError(.internalError, "cannot write the record of '\(record.name)'") }
                return record.logPath
            }
            guard errno == EEXIST else {
                throw MicroVMError(.permissionDenied, "cannot create the record of '\(record.name)' in \(directory): \(String(cString: strerror(errno)))")
            }
            if let old = read(record.name), ProcessIdentity.isAlive(pid: old.pid, startTime: old.pidStart) {
                throw MicroVMError.invalidArgument("a direct instance named '\(record.name)' is running (pid \(old.pid)): pick another --name or mvm stop it")
            }
            removeStale(record.name)
            try? FileManager.default.removeItem(atPath: file(record.name))
        }
        throw MicroVMError.invalidArgument("a direct instance named '\(record.name)' is being started by another process: pick another --name")
    }

    /// Rewrites the owner's own record (replaced whole, never seen half-written).
    func update(_ record: DirectInstanceRecord) throws {
        guard let r = read(record.name), r.pid == record.pid, r.pidStart == record.pidStart else { return }
        try Paths.writeScratch(try JSONEncoder.iso8601.encode(record), to: file(record.name), atomically: true)
    }

    /// Removes the record if it is still `owner`'s (another run may have claimed the name since).
    func release(_ name: String, owner: DirectInstanceRecord) {
        guard let r = read(name), r.pid == owner.pid, r.pidStart == owner.pidStart else { return }
        try? FileManager.default.removeItem(atPath: file(name))
    }

    /// Removes a record whose process is gone, with what its run left on the host: the tap it
    /// created and its cgroup (a VMM still in it is ended first: it lost its `mvm run`).
    func removeStale(_ name: String) {
        guard let r = read(name), !ProcessIdentity.isAlive(pid: r.pid, startTime: r.pidStart) else { return }
        if let vmm = r.vmmPID, let start = r.vmmStart, ProcessIdentity.isAlive(pid: vmm, startTime: start) {
            kill(vmm, SIGKILL)
        }
        if let tap = r.tap { TapDevice.delete(tap) }
        if let cgroup = r.cgroup { try? CgroupSet.existing(name: cgroup).remove() }
        // The run's files, but not its console log: `mvm logs` reads that after the end too.
        let files = VMMProcess.runFiles(in: (r.logPath as NSString).deletingLastPathComponent)
        for f in [files.config, files.timings] + (r.apiSocket.map { [$0] } ?? []) { unlink(f) }
        try? FileManager.default.removeItem(atPath: file(name))
    }

    func read(_ name: String) -> DirectInstanceRecord? {
        FileManager.default.contents(atPath: file(name)).flatMap { try? JSONDecoder.iso8601.decode(DirectInstanceRecord.self, from: $0) }
    }

    /// Records of running instances; stale ones are removed.
    func live() -> [DirectInstanceRecord] {
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).filter { $0.hasSuffix(".json") }.sorted()
        return names.compactMap { n -> DirectInstanceRecord? in
            let name = String(n.dropLast(5))
            guard let r = read(name) else { return nil }
            guard ProcessIdentity.isAlive(pid: r.pid, startTime: r.pidStart) else { removeStale(name); return nil }
            return r
        }
    }
}

extension JSONEncoder {
    static var iso8601: JSONEncoder { let e = JSONEncoder(); e.dateEncodingStrategy = .iso8601; return e }
}

extension JSONDecoder {
    static var iso8601: JSONDecoder { let d = JSONDecoder(); d.dateDecodingStrategy = .iso8601; return d }
}
