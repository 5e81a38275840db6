import Allocator
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
}

/// One JSON file per running direct instance. A record whose process is gone is stale and is
/// removed when seen; a name held by a live process cannot be claimed again.
struct InstanceRecords: Sendable {
    var directory: String

    func file(_ name: String) -> String { directory + "/" + name + ".json" }

    /// Writes the record (its log's directory too) and returns the log path; refuses a name a
    /// live instance holds.
    func claim(_ record: DirectInstanceRecord) throws -> String {
        try Paths.ensureDirectory(directory)
        try Paths.ensureDirectory((record.logPath as NSString).deletingLastPathComponent)
        if let old = read(record.name), ProcessIdentity.isAlive(pid: old.pid, startTime: old.pidStart), old.pid != record.pid {
            throw MicroVMError.invalidArgument("a direct instance named '\(record.name)' is running (pid \(old.pid)): pick another --name or mvm stop it")
        }
        let data = try JSONEncoder.iso8601.encode(record)
        try data.write(to: URL(fileURLWithPath: file(record.name)), options: .atomic)
        return record.logPath
    }

    func release(_ name: String) { try? FileManager.default.removeItem(atPath: file(name)) }

    func read(_ name: String) -> DirectInstanceRecord? {
        FileManager.default.contents(atPath: file(name)).flatMap { try? JSONDecoder.iso8601.decode(DirectInstanceRecord.self, from: $0) }
    }

    /// Records of running instances; stale ones are removed.
    func live() -> [DirectInstanceRecord] {
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).filter { $0.hasSuffix(".json") }.sorted()
        return names.compactMap { n -> DirectInstanceRecord? in
            let name = String(n.dropLast(5))
            guard let r = read(name) else { return nil }
            guard ProcessIdentity.isAlive(pid: r.pid, startTime: r.pidStart) else { release(name); return nil }
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
