import Foundation
import MicroVMCore
import Host
#if canImport(Glibc)
import Glibc
#endif

/// Who made a container: written into its bundle directory before anything else exists, so a
/// container whose owner died (mvm killed mid-run) is recognised and reaped by the next `mvm`.
struct OwnerRecord: Codable, Sendable {
    var pid: Int32
    /// The owner's start time in clock ticks (field 22 of /proc/PID/stat): a reused pid differs.
    var startTicks: UInt64
    var name: String
    var runtime: String
    var created: Date
    var cpus: Int
    var memory: ByteCount
    var netns: String?
    var hostVeth: String?

    static func current(name: String, runtime: String, cpus: Int, memory: ByteCount) -> OwnerRecord {
        OwnerRecord(pid: getpid(), startTicks: ProcessIdentity.startTime(pid: getpid()) ?? 0, name: name, runtime: runtime,
                    created: Date(), cpus: cpus, memory: memory)
    }

    /// The owner runs still: the same process (pid and start time), and not a zombie.
    var ownerAlive: Bool { ProcessIdentity.isAlive(pid: pid, startTime: startTicks) }
}


/// Where container state lives under `Paths.state`: runtime root, bundles, logs.
struct ContainerStore: Sendable {
    var base: String
    init(paths: Paths) { base = paths.state + "/containers" }

    var runtimeRoot: String { base + "/runc" }
    var bundles: String { base + "/bundles" }
    var logs: String { base + "/logs" }
    func bundle(_ id: String) -> String { bundles + "/" + id }
    func log(_ id: String) -> String { logs + "/" + id + ".log" }
    func ownerFile(_ id: String) -> String { bundle(id) + "/owner.json" }

    /// cgroups are host-wide while ids are per state directory, so the leaf carries a hash of
    /// the state directory: two MVM_STATE_DIRs running the same name never share a cgroup.
    func cgroupLeaf(_ id: String) -> String {
        var h: UInt32 = 2_166_136_261
        for b in base.utf8 { h = (h ^ UInt32(b)) &* 16_777_619 }
        return id + "-" + String(format: "%08x", h)
    }

    /// Publishes the bundle with its owner record in one rename, so the reaper never sees a
    /// bundle without an owner.
    func createBundle(id: String, owner: OwnerRecord) throws -> String {
        let fm = FileManager.default
        try Paths.ensureDirectory(bundles)
        try Paths.ensureDirectory(logs)
        let final = bundle(id)
        if fm.fileExists(atPath: final) {
            if let o = readOwner(id), o.ownerAlive {
                throw MicroVMError.invalidArgument("a container named '\(o.name)' is already running (owner pid \(o.pid)): pick another --name or stop it with mvm stop \(o.name)")
            }
            reapFiles(id)
        }
        let tmp = bundles + "/.new-\(id)-\(getpid())"
        try? fm.removeItem(atPath: tmp)
        try Paths.ensureDirectory(tmp)
        try writeJSON(owner, to: tmp + "/owner.json")
        guard rename(tmp, final) == 0 else {
            let e = errno
            try? fm.removeItem(atPath: tmp)
            throw MicroVMError(.backend, "cannot publish bundle '\(final)': \(String(cString: strerror(e))); another process may be starting a container with the same name")
        }
        return final
    }

    func updateOwner(_ id: String, _ owner: OwnerRecord) throws {
        try writeJSON(owner, to: ownerFile(id))
    }

    func readOwner(_ id: String) -> OwnerRecord? {
        guard let d = FileManager.default.contents(atPath: ownerFile(id)) else { return nil }
        let dec = JSONDecoder()
        dec.dateDecodingStrategy = .secondsSince1970
        return try? dec.decode(OwnerRecord.self, from: d)
    }

    func bundleIDs() -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: bundles)) ?? []).filter { !$0.hasPrefix(".") }.sorted()
    }

    func reapFiles(_ id: String) {
        try? FileManager.default.removeItem(atPath: bundle(id))
    }

    private func writeJSON<T: Encodable>(_ v: T, to path: String) throws {
        let enc = JSONEncoder()
        enc.dateEncodingStrategy = .secondsSince1970
        try Paths.writeScratch(enc.encode(v), to: path, atomically: true)
    }
}

/// The cgroup directories runc makes for `cgroupsPath` under each v1 controller and the unified
/// mount; removed explicitly because a runtime killed mid-way leaves them behind.
enum CgroupDirs {
    static let parent = "microvm"
    static let root = "/sys/fs/cgroup"

    /// Every directory that may hold a container's cgroup, across hierarchies (v1, hybrid, v2).
    static func candidates(id: String) -> [String] {
        var out = ["\(root)/\(parent)/\(id)"]
        for h in ((try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []).sorted() {
            out.append("\(root)/\(h)/\(parent)/\(id)")
        }
        return out.filter { FileManager.default.fileExists(atPath: $0) }
    }

    /// Kills what is left in the container's cgroups and removes them (rmdir only: a cgroup
    /// directory cannot be removed recursively). Returns the directories that remain.
    @discardableResult
    static func remove(id: String) -> [String] {
        var left: [String] = []
        for dir in candidates(id: id) {
            for attempt in 0..<50 {
                for pid in pids(in: dir) { _ = Glibc.kill(pid, SIGKILL) }
                // A frozen cgroup's tasks cannot die until thawed.
                if let s = try? String(contentsOfFile: dir + "/freezer.state", encoding: .utf8), !s.hasPrefix("THAWED") {
                    try? "THAWED".write(toFile: dir + "/freezer.state", atomically: false, encoding: .utf8)
                }
                if rmdir(dir) == 0 || errno == ENOENT { break }
                if attempt == 49 { left.append(dir) }
                usleep(20_000)
            }
        }
        return left
    }

    static func pids(in dir: String) -> [Int32] {
        let text = readWholeText(dir + "/cgroup.procs") ?? ""
        return text.split(separator: "\n").compactMap { Int32($0) }
    }
}
