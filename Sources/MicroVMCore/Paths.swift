import Foundation

/// Where MicroVM keeps state (ledger, instance records, libvirt's embedded root) and its cache
/// (built images, the rig image). Overridable with MVM_STATE_DIR and MVM_CACHE_DIR, which tests use.
public struct Paths: Sendable {
    public var state: String
    public var cache: String

    public init(state: String, cache: String) { self.state = state; self.cache = cache }

    public static var `default`: Paths {
        let env = ProcessInfo.processInfo.environment
        let root = getuid() == 0
        let home = env["HOME"] ?? "/tmp"
        return Paths(
            state: env["MVM_STATE_DIR"] ?? (root ? "/var/lib/microvm" : "\(home)/.local/state/microvm"),
            cache: env["MVM_CACHE_DIR"] ?? (root ? "/var/cache/microvm" : "\(home)/.cache/microvm"))
    }

    public var images: String { cache + "/images" }
    public var ledger: String { state + "/ledger.sqlite" }
    public var instances: String { state + "/instances" }
    public var libvirtRoot: String { state + "/libvirt" }
    public var hostProfile: String { state + "/host-profile.json" }

    /// Creates a directory (and parents); throws a clear error when it cannot.
    public static func ensureDirectory(_ path: String) throws {
        do { try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true) }
        catch { throw MicroVMError(.permissionDenied, "cannot create directory '\(path)': set MVM_STATE_DIR/MVM_CACHE_DIR to a writable place", cause: error) }
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
