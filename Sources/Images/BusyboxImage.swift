import Foundation
import Crypto
import MicroVMCore

/// Makes a one-layer busybox image tarball from the host's static busybox, as `docker save`
/// writes it (`manifest.json`, the configuration, `DIFFID/layer.tar`; `docker load` takes it) or
/// as an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/…`). It is the image the
/// tests and the wiring examples run where no registry can be reached; it has the applets as
/// symlinks in /bin, and `sh` as its command unless `config` says otherwise.
public enum BusyboxImage {
    public enum Format: String, Sendable, CaseIterable { case dockerSave = "docker-save", oci }

    public static let defaultConfig = ImageConfig(cmd: ["sh"], env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])

    /// Writes the tarball to `path`; `directories` are made in the image (e.g. a working directory).
    public static func make(at path: String, format: Format = .dockerSave, tag: String = "busybox:latest", config: ImageConfig = defaultConfig,
                            directories: [String] = [], busybox: String = "/bin/busybox") throws {
        guard FileManager.default.isExecutableFile(atPath: busybox) else {
            throw MicroVMError.notFound("'\(busybox)' is not there: apt-get install busybox-static")
        }
        let fm = FileManager.default
        let work = fm.temporaryDirectory.appendingPathComponent("mvm-busybox-\(UUID().uuidString)").path
        defer { try? fm.removeItem(atPath: work) }
        let root = work + "/rootfs", out = work + "/image"
        try Paths.ensureDirectory(root + "/bin")
        try Paths.ensureDirectory(out)
        for d in ["etc", "tmp", "root"] + directories.map({ String($0.drop { $0 == "/" }) }) { try Paths.ensureDirectory(root + "/" + d) }
        try fm.copyItem(atPath: busybox, toPath: root + "/bin/busybox")
        let applets = try ProcessRunner.check([busybox, "--list"], timeout: 30, package: "busybox-static").stdoutText
        for applet in applets.split(separator: "\n").map(String.init) where !applet.isEmpty && !applet.contains("/") && applet != "busybox" {
            try? fm.createSymbolicLink(atPath: root + "/bin/" + applet, withDestinationPath: "busybox")
        }
        try "root:x:0:0:root:/root:/bin/sh\n".write(toFile: root + "/etc/passwd", atomically: true, encoding: .utf8)
        let layer = work + "/layer.tar"
        try ProcessRunner.check(["tar", "-C", root, "--numeric-owner", "--owner=0", "--group=0", "--sort=name", "-cf", layer, "."],
                                timeout: 120, package: "tar")
        let layerDigest = try sha256(file: layer)
        let configJSON = try document(config, diffID: layerDigest)
        let configDigest = sha256(configJSON)
        switch format {
        case .dockerSave:
            try Paths.ensureDirectory(out + "/" + layerDigest)
            try fm.moveItem(atPath: layer, toPath: out + "/\(layerDigest)/layer.tar")
            try configJSON.write(to: URL(fileURLWithPath: out + "/\(configDigest).json"))
            let manifest: [[String: Any]] = [["Config": "\(configDigest).json", "RepoTags": [tag], "Layers": ["\(layerDigest)/layer.tar"]]]
            try JSONSerialization.data(withJSONObject: manifest, options: [.sortedKeys]).write(to: URL(fileURLWithPath: out + "/manifest.json"))
        case .oci:
            let blobs = out + "/blobs/sha256"
            try Paths.ensureDirectory(blobs)
            let layerSize = (try fm.attributesOfItem(atPath: layer)[.size] as? Int) ?? 0
            try fm.moveItem(atPath: layer, toPath: blobs + "/" + layerDigest)
            try configJSON.write(to: URL(fileURLWithPath: blobs + "/" + configDigest))
            let manifest = try JSONSerialization.data(withJSONObject: [
                "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": ["mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:\(configDigest)", "size": configJSON.count],
                "layers": [["mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:\(layerDigest)", "size": layerSize]],
            ] as [String: Any], options: [.sortedKeys])
            let manifestDigest = sha256(manifest)
            try manifest.write(to: URL(fileURLWithPath: blobs + "/" + manifestDigest))
            let index = try JSONSerialization.data(withJSONObject: [
                "schemaVersion": 2,
                "manifests": [["mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:\(manifestDigest)", "size": manifest.count,
                               "annotations": ["org.opencontainers.image.ref.name": tag]]],
            ] as [String: Any], options: [.sortedKeys])
            try index.write(to: URL(fileURLWithPath: out + "/index.json"))
            try #"{"imageLayoutVersion":"1.0.0"}"#.write(toFile: out + "/oci-layout", atomically: true, encoding: .utf8)
        }
        try ProcessRunner.check(["tar", "-C", out, "--numeric-owner", "--owner=0", "--group=0", "--sort=name", "-cf", path, "."],
                                timeout: 120, package: "tar")
    }

    /// The image configuration document: what to run, and the layer's uncompressed digest.
    static func document(_ c: ImageConfig, diffID: String) throws -> Data {
        var config: [String: Any] = ["Env": c.env, "Cmd": c.cmd]
        if !c.entrypoint.isEmpty { config["Entrypoint"] = c.entrypoint }
        if !c.workingDir.isEmpty { config["WorkingDir"] = c.workingDir }
        if !c.user.isEmpty { config["User"] = c.user }
        return try JSONSerialization.data(withJSONObject: [
            "architecture": "amd64", "os": "linux", "config": config,
            "rootfs": ["type": "layers", "diff_ids": ["sha256:\(diffID)"]],
        ] as [String: Any], options: [.sortedKeys])
    }

    static func sha256(_ data: Data) -> String { SHA256.hash(data: data).map { String(format: "%02x", $0) }.joined() }
    static func sha256(file: String) throws -> String { try ContainerImageStore.sha256(file: file) }
}
