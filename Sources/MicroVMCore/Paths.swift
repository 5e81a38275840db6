import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// Where MicroVM keeps state (ledger, instance records, libvirt's embedded root) and its cache
/// (built images, the rig image). Overridable with MVM_STATE_DIR and MVM_CACHE_DIR, which tests use.
public struct Paths: Sendable {
    public var state: String
    public var cache: String

    public init(state: String, cache: String) { self.state = state; self.cache = cache }

    public static var `default`: Paths {
        let root = getuid() == 0
        let home = environmentVariable("HOME") ?? "/tmp"
        return Paths(
            state: environmentVariable("MVM_STATE_DIR") ?? (root ? "/var/lib/microvm" : "\(home)/.local/state/microvm"),
            cache: environmentVariable("MVM_CACHE_DIR") ?? (root ? "/var/cache/microvm" : "\(home)/.cache/microvm"))
    }

    public var images: String { cache + "/images" }
    /// Container images (`mvm run --image`) unpacked and converted, by their tarball's SHA-256.
    public var containerImages: String { cache + "/container-images" }
    public var ledger: String { state + "/ledger.sqlite" }
    public var instances: String { state + "/instances" }
    public var libvirtRoot: String { state + "/libvirt" }
    public var hostProfile: String { state + "/host-profile.json" }

    /// Creates a directory (and parents); throws a clear error when it cannot.
    public static func ensureDirectory(_ path: String) throws {
        do { try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true) }
        catch { throw MicroVMError(.permissionDenied, "cannot create directory '\(path)': set MVM_STATE_DIR/MVM_CACHE_DIR to a writable place", cause: error) }
    }

    /// Runs `body` holding an exclusive lock on `lockPath` (flock; the file is made if missing):
    /// how builders of one cache in several processes take turns.
    public static func withLockFile<T>(_ lockPath: String, _ body: () throws -> T) throws -> T {
        let fd = open(lockPath, O_CREAT | O_RDWR | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            throw MicroVMError(.permissionDenied, "cannot open lock file '\(lockPath)': \(String(cString: strerror(errno))); set MVM_CACHE_DIR to a writable place")
        }
        defer { close(fd) }
        while flock(fd, LOCK_EX) != 0 {
            guard errno == EINTR else { throw MicroVMError(.internalError, "flock on '\(lockPath)' failed: \(String(cString: strerror(errno)))") }
        }
        defer { flock(fd, LOCK_UN) }
        return try body()
    }

    /// Writes a file of one run's scratch state (a bundle's config, an owner record) without the
    /// fsync Foundation's `Data.write` adds: such files mean nothing after a host crash, and each
    /// sync is milliseconds on the launch path. `atomically` writes a sibling and renames it, so
    /// readers never see half a file.
    public static func writeScratch(_ data: Data, to path: String, atomically: Bool = false) throws {
        let target = atomically ? path + ".tmp-\(getpid())" : path
        let fd = open(target, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw MicroVMError(.permissionDenied, "cannot write '\(path)'", cause: SystemCallError("open", errno: errno)) }
        var failure: Int32 = 0
        data.withUnsafeBytes { raw in
            var off = 0
            while off < raw.count {
                let n = Glibc.write(fd, raw.baseAddress! + off, raw.count - off)
                if n < 0 { if errno == EINTR { continue }; failure = errno; return }
                off += n
            }
        }
        close(fd)
        if failure == 0, atomically, rename(target, path) != 0 { failure = errno }
        if failure != 0 {
            if atomically { unlink(target) }
            throw MicroVMError(.backend, "cannot write '\(path)'", cause: SystemCallError("write", errno: failure))
        }
    }

    /// The repository's own files (images/, config/), found next to the executable's package or via MVM_SOURCE_DIR.
    public static func sourceDirectory(file: String = #filePath) -> String {
        if let s = ProcessInfo.processInfo.environment["MVM_SOURCE_DIR"] { return s }
        // #filePath is Sources/MicroVMCore/Paths.swift inside the package.
        var url = URL(fileURLWithPath: file)
        for _ in 0..<3 { url.deleteLastPathComponent() }
        return url.path
    }
}
