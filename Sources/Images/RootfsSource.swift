import Foundation
import MicroVMCore

/// Turns a container image tarball into a rootfs tree: `docker save` output (manifest.json with
/// layer paths) or an OCI image layout (oci-layout, index.json, blobs). Layers are applied in
/// order; whiteouts (`.wh.NAME` removes NAME, `.wh..wh..opq` empties its directory) remove what
/// lower layers put there. Whiteout and manifest paths that would leave the target are refused.
public enum RootfsSource {
    /// The layer files, in order, of the image in an unpacked image tarball.
    public static func layers(inImageDirectory dir: String) throws -> [String] {
        try contents(ofImageDirectory: dir).layers
    }

    /// The layer files, in order, and the image's configuration file (nil where the image has
    /// none), of the image in an unpacked image tarball.
    public static func contents(ofImageDirectory dir: String) throws -> (layers: [String], config: String?) {
        let fm = FileManager.default
        if let data = fm.contents(atPath: dir + "/manifest.json"),
           let entries = try? JSONDecoder().decode([SaveManifest].self, from: data) {
            guard let first = entries.first, !first.Layers.isEmpty else {
                throw MicroVMError(.invalidImage, "manifest.json in the image lists no layers: the tarball is not a usable docker save image")
            }
            return (try first.Layers.map { try inside(dir, $0) }, try first.Config.map { try inside(dir, $0) })
        }
        if let data = fm.contents(atPath: dir + "/index.json") {
            guard let index = try? JSONDecoder().decode(OCIIndex.self, from: data), let m = index.manifests.first else {
                throw MicroVMError(.invalidImage, "index.json in the image has no manifests: the tarball is not a usable OCI image layout")
            }
            let manifestPath = try blob(dir, m.digest)
            guard let mdata = fm.contents(atPath: manifestPath),
                  let manifest = try? JSONDecoder().decode(OCIManifest.self, from: mdata) else {
                throw MicroVMError(.invalidImage, "image manifest \(m.digest) is missing or not JSON")
            }
            guard let layers = manifest.layers, !layers.isEmpty else {
                throw MicroVMError(.invalidImage, "image manifest \(m.digest) lists no layers (an index of indexes is not supported)")
            }
            return (try layers.map { try blob(dir, $0.digest) }, try manifest.config.map { try blob(dir, $0.digest) })
        }
        throw MicroVMError(.invalidImage, "the tarball has neither manifest.json (docker save) nor index.json (OCI layout): pass an image made by 'docker save' or an OCI image layout")
    }

    /// Extracts the image in `tarball` into the (new or empty) directory `target`.
    @discardableResult
    public static func extract(tarball: String, into target: String) throws -> ImageConfig {
        let fm = FileManager.default
        guard fm.fileExists(atPath: tarball) else {
            throw MicroVMError.notFound("image tarball '\(tarball)' does not exist")
        }
        try Paths.ensureDirectory(target)
        let work = fm.temporaryDirectory.appendingPathComponent("mvm-image-\(UUID().uuidString)").path
        try Paths.ensureDirectory(work)
        defer { try? fm.removeItem(atPath: work) }
        try tar(["-xf", tarball, "-C", work, "--no-same-owner"])
        let root = try realpath(target)
        let image = try contents(ofImageDirectory: work)
        for layer in image.layers {
            try apply(layer: layer, to: root)
        }
        guard let file = image.config else { return ImageConfig() }
        guard let data = FileManager.default.contents(atPath: file) else {
            throw MicroVMError(.invalidImage, "the image's configuration \((file as NSString).lastPathComponent) is missing from the tarball")
        }
        return try ImageConfig(json: data)
    }

    /// Applies one layer: its whiteouts first (they name lower-layer content), then its files.
    public static func apply(layer: String, to root: String) throws {
        let listing = try tar(["-tf", layer]).stdoutText
        for raw in listing.split(separator: "\n") {
            var name = String(raw)
            while name.hasPrefix("./") { name.removeFirst(2) }
            let comps = name.split(separator: "/").map(String.init)
            guard let base = comps.last, base.hasPrefix(".wh.") else { continue }
            guard !comps.contains(".."), !name.hasPrefix("/") else {
                throw MicroVMError(.invalidImage, "layer entry '\(name)' escapes the rootfs: the image is malformed or hostile")
            }
            let dir = comps.dropLast().joined(separator: "/")
            guard let parent = try? resolvedInside(root, dir) else { continue }
            if base == ".wh..wh..opq" {
                for child in (try? FileManager.default.contentsOfDirectory(atPath: parent)) ?? [] {
                    try? FileManager.default.removeItem(atPath: parent + "/" + child)
                }
            } else {
                let victim = String(base.dropFirst(4))
                guard !victim.isEmpty, victim != ".", victim != ".." else { continue }
                try? FileManager.default.removeItem(atPath: parent + "/" + victim)
            }
        }
        // GNU tar refuses members with '..' and strips leading '/', but it does follow a directory
        // symlink that a lower layer planted: import only images you would run anyway.
        try tar(["-xf", layer, "-C", root, "--exclude=.wh.*", "--numeric-owner"])
    }

    @discardableResult
    static func tar(_ args: [String]) throws -> ProcessRunner.Output {
        let out = try ProcessRunner.run(["tar"] + args, timeout: 600, package: "tar")
        guard out.status == 0 else {
            throw MicroVMError(.invalidImage, "tar \(args.prefix(2).joined(separator: " ")) failed: \(out.stderrText.trimmingCharacters(in: .whitespacesAndNewlines).suffix(500))")
        }
        return out
    }

    static func realpath(_ p: String) throws -> String {
        guard let r = Glibc.realpath(p, nil) else { throw MicroVMError.notFound("'\(p)' does not exist") }
        defer { free(r) }
        return String(cString: r)
    }

    /// `dir` inside `root` with symlinks resolved, refusing anything that resolves outside.
    static func resolvedInside(_ root: String, _ dir: String) throws -> String {
        let r = try realpath(dir.isEmpty ? root : root + "/" + dir)
        guard r == root || r.hasPrefix(root + "/") else {
            throw MicroVMError(.invalidImage, "'\(dir)' resolves outside the rootfs")
        }
        return r
    }

    static func inside(_ dir: String, _ rel: String) throws -> String {
        guard !rel.hasPrefix("/"), !rel.split(separator: "/").contains("..") else {
            throw MicroVMError(.invalidImage, "image file '\(rel)' points outside the image")
        }
        return dir + "/" + rel
    }

    static func blob(_ dir: String, _ digest: String) throws -> String {
        let parts = digest.split(separator: ":", maxSplits: 1).map(String.init)
        guard parts.count == 2, parts[0].allSatisfy({ $0.isLetter || $0.isNumber }),
              !parts[1].isEmpty, parts[1].allSatisfy({ $0.isHexDigit }) else {
            throw MicroVMError(.invalidImage, "'\(digest)' is not a content digest (algorithm:hex)")
        }
        return "\(dir)/blobs/\(parts[0])/\(parts[1])"
    }

    struct SaveManifest: Decodable { var Config: String?; var Layers: [String] }
    struct Descriptor: Decodable { var digest: String; var mediaType: String? }
    struct OCIIndex: Decodable { var manifests: [Descriptor] }
    struct OCIManifest: Decodable { var config: Descriptor?; var layers: [Descriptor]? }
}

#if canImport(Glibc)
import Glibc
#endif
