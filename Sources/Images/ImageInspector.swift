import CGuestfs
import CLazyLibs
import Foundation
import Host
import MicroVMCore

/// What libguestfs found on a disk image.
public struct DiskReport: Sendable, Equatable, Codable {
    public struct Filesystem: Sendable, Equatable, Codable {
        public var device: String
        public var type: String
        public var sizeBytes: Int64?
        public var label: String?
    }
    public struct OperatingSystem: Sendable, Equatable, Codable {
        public var root: String
        public var type: String?
        public var distro: String?
        public var productName: String?
    }
    public var path: String
    public var fileBytes: UInt64
    public var partitions: [String]
    public var filesystems: [Filesystem]
    public var operatingSystems: [OperatingSystem]
}

/// Inspects disk images read-only through libguestfs's C API (it boots a small appliance VM).
///
/// ```swift
/// let report = try ImageInspector.inspect(path: image.rootfsDisk)
/// print(report.filesystems.map(\.type))   // ["ext4"]
/// ```
public enum ImageInspector {
    public static func inspect(path: String) throws -> DiskReport {
        let fm = FileManager.default
        var isDir: ObjCBool = false
        guard fm.fileExists(atPath: path, isDirectory: &isDir), !isDir.boolValue else {
            throw MicroVMError.notFound("disk image '\(path)' does not exist (or is a directory): pass a disk image file")
        }
        let size = (try? fm.attributesOfItem(atPath: path))?[.size] as? UInt64 ?? 0
        guard size >= 512 else {
            throw MicroVMError(.invalidImage, "disk image '\(path)' is \(size) bytes, too small to hold a partition table or filesystem: it is empty or truncated")
        }
        guard mvm_lazy_available(1) != 0 else {
            throw MicroVMError.notFound("image inspection needs libguestfs (libguestfs.so.0), which is not installed: apt-get install libguestfs-tools")
        }
        guard let g = guestfs_create() else {
            throw MicroVMError(.backend, "libguestfs could not create a handle: check that libguestfs0 is installed (apt-get install libguestfs-tools)")
        }
        defer { guestfs_close(g) }
        // Errors come back through guestfs_last_error rather than being printed on stderr.
        guestfs_set_error_handler(g, nil, nil)
        func lastError(_ what: String) -> MicroVMError {
            let msg = guestfs_last_error(g).map { String(cString: $0) } ?? "unknown error"
            return MicroVMError(.invalidImage, "inspecting '\(path)': \(what) failed: \(msg)")
        }
        // The direct backend needs no libvirtd; this host's KVM cannot run the appliance, so TCG
        // unless the host has hardware virtualization.
        guard guestfs_set_backend(g, "direct") == 0 else { throw lastError("selecting the direct backend") }
        if HostProfile.current().kvm.verdict != .hardware {
            let ok = withCStringArray(["force_tcg"]) { guestfs_set_backend_settings(g, $0) }
            guard ok == 0 else { throw lastError("setting force_tcg") }
        }
        var opts = guestfs_add_drive_opts_argv()
        opts.bitmask = 1 << 0   // GUESTFS_ADD_DRIVE_OPTS_READONLY_BITMASK
        opts.readonly = 1
        guard guestfs_add_drive_opts_argv(g, path, &opts) == 0 else { throw lastError("adding the drive") }
        guard guestfs_launch(g) == 0 else { throw lastError("launching the appliance") }
        defer { _ = guestfs_shutdown(g) }

        guard let parts = guestfs_list_partitions(g) else { throw lastError("listing partitions") }
        let partitions = takeStrings(parts)
        guard let fsList = guestfs_list_filesystems(g) else { throw lastError("listing filesystems") }
        let pairs = takeStrings(fsList)
        var filesystems: [DiskReport.Filesystem] = []
        var i = 0
        while i + 1 < pairs.count {
            let dev = pairs[i], type = pairs[i + 1]
            i += 2
            guard type != "unknown" else { continue }
            let bytes = guestfs_blockdev_getsize64(g, dev)
            let label = guestfs_vfs_label(g, dev).map { takeString($0) }
            filesystems.append(.init(device: dev, type: type, sizeBytes: bytes >= 0 ? bytes : nil, label: label?.isEmpty == false ? label : nil))
        }
        guard !filesystems.isEmpty || !partitions.isEmpty else {
            throw MicroVMError(.invalidImage, "disk image '\(path)' holds no partition table and no filesystem libguestfs recognises: it is corrupt or not a disk image")
        }
        var oses: [DiskReport.OperatingSystem] = []
        if let roots = guestfs_inspect_os(g) {
            for root in takeStrings(roots) {
                oses.append(.init(root: root,
                                  type: guestfs_inspect_get_type(g, root).map { takeString($0) },
                                  distro: guestfs_inspect_get_distro(g, root).map { takeString($0) },
                                  productName: guestfs_inspect_get_product_name(g, root).map { takeString($0) }))
            }
        }
        return DiskReport(path: path, fileBytes: size, partitions: partitions, filesystems: filesystems, operatingSystems: oses)
    }

    /// Copies and frees a malloc'd string from libguestfs.
    private static func takeString(_ p: UnsafeMutablePointer<CChar>) -> String {
        // SAFETY: libguestfs returns a NUL-terminated string the caller owns and must free.
        defer { free(p) }
        return String(cString: p)
    }

    /// Copies and frees a NULL-terminated malloc'd string list from libguestfs.
    private static func takeStrings(_ list: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>) -> [String] {
        var out: [String] = []
        var i = 0
        // SAFETY: the list is NULL-terminated and the caller owns it and every string in it.
        while let s = list[i] {
            out.append(String(cString: s))
            free(s)
            i += 1
        }
        free(list)
        return out
    }

    private static func withCStringArray<R>(_ strings: [String], _ body: (UnsafePointer<UnsafeMutablePointer<CChar>?>) -> R) -> R {
        var ptrs: [UnsafeMutablePointer<CChar>?] = strings.map { strdup($0) }
        ptrs.append(nil)
        // SAFETY: the strdup'd strings and the array outlive the call; libguestfs copies them.
        defer { for p in ptrs { free(p) } }
        return ptrs.withUnsafeBufferPointer { body($0.baseAddress!) }
    }
}
