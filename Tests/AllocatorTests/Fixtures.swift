import Foundation
import Host
import MicroVMCore
@testable import Allocator

/// Temporary directories and fake /proc + /sys trees for allocator tests.
enum Fixture {
    static func tempDir(_ tag: String = "alloc") -> String {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("mvm-\(tag)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }

    static func write(_ path: String, _ text: String) throws {
        try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try text.write(toFile: path, atomically: true, encoding: .utf8)
    }

    /// A fake host under `root`: `root/proc` and `root/sys`. `cores` are SMT sibling groups,
    /// `nodes` the CPUs of each NUMA node (none: no node directory, like a kernel without NUMA).
    @discardableResult
    static func host(at root: String, cores: [[Int]], nodes: [[Int]] = [], memTotalKB: UInt64 = 16 << 20,
                     hugePages: (total: Int, free: Int) = (0, 0)) throws -> HostRoots {
        let cpus = cores.flatMap { $0 }.sorted()
        try write(root + "/sys/devices/system/cpu/online", CPUList.format(cpus) + "\n")
        for core in cores {
            for cpu in core {
                try write(root + "/sys/devices/system/cpu/cpu\(cpu)/topology/thread_siblings_list", CPUList.format(core) + "\n")
            }
        }
        for (i, node) in nodes.enumerated() {
            try write(root + "/sys/devices/system/node/node\(i)/cpulist", CPUList.format(node) + "\n")
            try write(root + "/sys/devices/system/node/node\(i)/meminfo",
                      "Node \(i) MemTotal:       \(memTotalKB / UInt64(nodes.count)) kB\nNode \(i) MemFree:        1000 kB\n")
        }
        try write(root + "/proc/meminfo", """
            MemTotal:       \(memTotalKB) kB
            MemFree:        \(memTotalKB / 2) kB
            HugePages_Total:    \(hugePages.total)
            HugePages_Free:     \(hugePages.free)
            Hugepagesize:       2048 kB

            """)
        return HostRoots(proc: root + "/proc", sys: root + "/sys")
    }

    static func reservation(cpus: Int = 0, memory: ByteCount = .gibibytes(1), overcommit: Double = 1.0, cpuList: String? = nil) -> HostReservation {
        // HostReservation has no public memberwise initializer: build it the way the config file does.
        let list = cpuList.map { ", \"cpuList\": \"\($0)\"" } ?? ""
        let json = "{\"cpus\": \(cpus), \"memory\": \(memory.bytes), \"memoryOvercommit\": \(overcommit)\(list)}"
        return try! JSONDecoder().decode(HostReservation.self, from: Data(json.utf8))
    }

    /// An allocator with its own ledger over `capacity`; `dead` pids count as exited.
    static func allocator(_ capacity: HostCapacity, dead: DeadSet = DeadSet()) throws -> (Allocator, String) {
        let dir = tempDir()
        let a = try Allocator(capacity: capacity, ledgerPath: dir + "/ledger.sqlite", ownerAlive: { pid, _ in !dead.contains(pid) })
        return (a, dir)
    }
}

/// The pids a test has declared dead.
final class DeadSet: @unchecked Sendable {
    private let lock = NSLock()
    private var pids = Set<Int32>()
    func insert(_ pid: Int32) { lock.lock(); pids.insert(pid); lock.unlock() }
    func contains(_ pid: Int32) -> Bool { lock.lock(); defer { lock.unlock() }; return pids.contains(pid) }
}
