import Foundation
import Host
import MicroVMCore
#if canImport(Glibc)
import Glibc
#endif

/// The default embedded driver's roots: one per process, named `PID-START`.
///
/// libvirt's embedded QEMU driver locks its root for the one process that opened it, and a
/// process can open one root only. With one root for the host, one `mvm run --mode hosted` (or
/// one mvm-runtime container, or the bench) at a time could run hosted VMs; with a root per
/// process they run side by side, each process holding any number of domains in its own.
///
/// The driver binds QEMU's monitor socket under its root, and a socket path holds at most 107
/// bytes, so for root the roots live in a short place of their own, `/run/microvm/libvirt`
/// (runtime state, as /run is); other users' under the state directory, `libvirt/roots`.
/// Through the state directory's `libvirt` the roots share QEMU's capabilities cache
/// (`cache/qemu/capabilities`, a link in each root: probing QEMU afresh costs seconds) and the
/// run directories (`runs/NAME`, which keep instance names unique across processes).
/// A root goes when its process exits, or, after a kill, when `mvm ps` or `mvm gc` (or the
/// next hosted run) finds its process gone and no QEMU of its still running.
public enum EmbeddedRoots {
    public static func directory(_ paths: Paths) -> String {
        getuid() == 0 ? "/run/microvm/libvirt" : paths.libvirtRoot + "/roots"
    }

    /// This process's root: its pid and start time, so a reused pid never adopts a dead
    /// process's root.
    static func own(_ paths: Paths) -> String { directory(paths) + "/" + ownName }

    /// Read from /proc once: every backend made and every connection asked for names the root.
    private static let ownName = "\(getpid())-\(ProcessIdentity.startTime(pid: getpid()) ?? 0)"

    /// The roots, of live processes or not yet swept, that share `paths`' state directory.
    public static func roots(sharing paths: Paths) -> [String] {
        let dir = directory(paths)
        let shared = sharedCache(paths)
        return ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).sorted().map { dir + "/" + $0 }.filter {
            (try? FileManager.default.destinationOfSymbolicLink(atPath: $0 + "/cache/qemu/capabilities")) == shared
        }
    }

    static func sharedCache(_ paths: Paths) -> String { paths.libvirtRoot + "/cache/qemu/capabilities" }

    /// The process a root belongs to, from its name.
    static func owner(of name: String) -> (pid: Int32, start: UInt64)? {
        let parts = name.split(separator: "-")
        guard parts.count == 2, let pid = Int32(parts[0]), pid > 0, let start = UInt64(parts[1]) else { return nil }
        return (pid, start)
    }

    /// The shared capabilities cache, linked into `root` before libvirt opens it, and the
    /// root's removal at exit; once per process. Roots of processes that are gone are swept first.
    static func adopt(_ root: String, paths: Paths) throws {
        lock.lock(); defer { lock.unlock() }
        guard adopted == nil else { return }
        sweep(paths)
        let shared = sharedCache(paths)
        try Paths.ensureDirectory(shared)
        try Paths.ensureDirectory(root + "/cache/qemu")
        let link = root + "/cache/qemu/capabilities"
        if (try? FileManager.default.destinationOfSymbolicLink(atPath: link)) != shared {
            try? FileManager.default.removeItem(atPath: link)
            guard symlink(shared, link) == 0 else {
                throw MicroVMError(.permissionDenied, "cannot link \(link) to \(shared): \(String(cString: strerror(errno))): make the state directory writable or set MVM_STATE_DIR")
            }
        }
        adopted = root
        atexit { EmbeddedRoots.removeOwnAtExit() }
    }

    /// Removes the roots whose process is gone and which run no QEMU; returns them.
    @discardableResult
    static func sweep(_ paths: Paths) -> [String] {
        let dir = directory(paths)
        let names = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        var removed: [String] = []
        for name in names {
            guard let o = owner(of: name), !ProcessIdentity.isAlive(pid: o.pid, startTime: o.start) else { continue }
            let root = dir + "/" + name
            guard !runsQEMU(root) else { continue }
            if (try? FileManager.default.removeItem(atPath: root)) != nil { removed.append(root) }
        }
        return removed
    }

    /// Whether a QEMU the root's driver started still runs: a domain's pid file (not the
    /// driver's own lock, `driver.pid`) names a live process.
    static func runsQEMU(_ root: String) -> Bool {
        let run = root + "/run/qemu"
        let files = (try? FileManager.default.contentsOfDirectory(atPath: run)) ?? []
        return files.contains { f in
            guard f.hasSuffix(".pid"), f != "driver.pid", let text = try? String(contentsOfFile: run + "/" + f, encoding: .utf8),
                  let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)), pid > 0 else { return false }
            return ProcessIdentity.isAlive(pid: pid, startTime: nil)
        }
    }

    private static let lock = NSLock()
    nonisolated(unsafe) private static var adopted: String?

    private static func removeOwnAtExit() {
        guard let root = adopted else { return }
        // A domain destroyed just before the exit may leave its QEMU ending for a moment.
        for _ in 0..<20 where runsQEMU(root) { usleep(100_000) }
        guard !runsQEMU(root) else { return }
        try? FileManager.default.removeItem(atPath: root)
    }
}
