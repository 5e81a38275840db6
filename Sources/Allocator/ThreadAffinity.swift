import CLinux
import Foundation
import MicroVMCore

/// Pins threads to host CPUs (sched_setaffinity) and reads back where a thread may run.
public enum ThreadAffinity {
    private static let maskBytes = NativeThread.affinityMaskBytes

    /// Restricts thread `tid` (0: the calling thread) to `cpus`.
    public static func pin(thread tid: Int32 = 0, to cpus: [Int]) throws {
        let bits = maskBytes * 8
        guard !cpus.isEmpty else { throw MicroVMError.invalidArgument("cannot pin a thread to an empty CPU list") }
        if let bad = cpus.first(where: { $0 < 0 || $0 >= bits }) {
            throw MicroVMError.invalidArgument("CPU \(bad) is outside 0..<\(bits)")
        }
        let failure = NativeThread.setAffinity(thread: tid, to: cpus)
        guard failure == 0 else {
            throw MicroVMError(.invalidArgument, "cannot pin thread \(tid) to CPUs \(CPUList.format(cpus)): are they online and inside this process's cpuset?",
                               cause: SystemCallError("sched_setaffinity", errno: failure))
        }
    }

    /// The CPUs thread `tid` (0: the calling thread) may run on, from the kernel.
    public static func affinity(thread tid: Int32 = 0) throws -> [Int] {
        var set = [UInt8](repeating: 0, count: maskBytes)
        guard set.withUnsafeMutableBytes({ clinux_sched_getaffinity(tid, maskBytes, $0.baseAddress) }) >= 0 else {
            throw MicroVMError(.notFound, "cannot read thread \(tid)'s affinity", cause: SystemCallError("sched_getaffinity", errno: errno))
        }
        return (0..<(maskBytes * 8)).filter { set[$0 / 8] & UInt8(1 << ($0 % 8)) != 0 }
    }

    /// Cpus_allowed_list of a process (or one of its threads) from /proc, as a cgroup's cpuset
    /// and sched_setaffinity leave it.
    public static func allowedCPUs(pid: Int32, thread: Int32? = nil, procRoot: String = "/proc") throws -> [Int] {
        let path = thread.map { "\(procRoot)/\(pid)/task/\($0)/status" } ?? "\(procRoot)/\(pid)/status"
        guard let status = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw MicroVMError.notFound("cannot read \(path): is the process still running?")
        }
        guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix("Cpus_allowed_list:") }) else {
            throw MicroVMError.notFound("\(path) has no Cpus_allowed_list line")
        }
        return try CPUList.parse(String(line.dropFirst("Cpus_allowed_list:".count)))
    }
}
