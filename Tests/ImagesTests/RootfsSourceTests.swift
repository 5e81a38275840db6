import Foundation
import Testing
import MicroVMCore
@testable import Images

/// Builds tiny images by hand: two layers, the second with a file whiteout and an opaque dir.
@Suite("Image tarball import")
final class RootfsSourceTests {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mvm-img-\(UUID().uuidString.prefix(8))").path
    deinit { try? FileManager.default.removeItem(atPath: dir) }

    func write(_ path: String, _ text: String) throws {
        try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try text.write(toFile: path, atomically: true, encoding: .utf8)
    }

    /// Returns the two layer tarballs.
    func makeLayers() throws -> (String, String) {
        try write(dir + "/l1/etc/keep", "keep")
        try write(dir + "/l1/etc/gone", "gone")
        try write(dir + "/l1/opaque/old", "old")
        try write(dir + "/l2/etc/.wh.gone", "")
        try write(dir + "/l2/opaque/.wh..wh..opq", "")
        try write(dir + "/l2/opaque/new", "new")
        try write(dir + "/l2/etc/added", "added")
        try FileManager.default.createDirectory(atPath: dir + "/img", withIntermediateDirectories: true)
        try ProcessRunner.check(["tar", "-C", dir + "/l1", "-cf", dir + "/layer1.tar", "."])
        try ProcessRunner.check(["tar", "-C", dir + "/l2", "-czf", dir + "/layer2.tar.gz", "."])
        return (dir + "/layer1.tar", dir + "/layer2.tar.gz")
    }

    func expectMerged(_ root: String) throws {
        let fm = FileManager.default
        #expect(try String(contentsOfFile: root + "/etc/keep", encoding: .utf8) == "keep")
        #expect(try String(contentsOfFile: root + "/etc/added", encoding: .utf8) == "added")
        #expect(!fm.fileExists(atPath: root + "/etc/gone"))
        #expect(!fm.fileExists(atPath: root + "/etc/.wh.gone"))
        #expect(!fm.fileExists(atPath: root + "/opaque/old"))
        #expect(fm.fileExists(atPath: root + "/opaque/new"))
        #expect(!fm.fileExists(atPath: root + "/opaque/.wh..wh..opq"))
    }

    @Test func dockerSaveLayout() throws {
        let (l1, l2) = try makeLayers()
        let img = dir + "/img"
        try FileManager.default.createDirectory(atPath: img + "/aaa", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: img + "/bbb", withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: l1, toPath: img + "/aaa/layer.tar")
        try FileManager.default.copyItem(atPath: l2, toPath: img + "/bbb/layer.tar")
        try write(img + "/manifest.json", #"[{"Config":"c.json","RepoTags":["t:1"],"Layers":["aaa/layer.tar","bbb/layer.tar"]}]"#)
        try write(img + "/c.json", #"{"architecture":"amd64","config":{"Env":["PATH=/bin","A=b=c"],"Entrypoint":["/bin/tini","--"],"Cmd":["sh"],"WorkingDir":"/srv","User":"1000"}}"#)
        try ProcessRunner.check(["tar", "-C", img, "-cf", dir + "/save.tar", "."])
        let config = try RootfsSource.extract(tarball: dir + "/save.tar", into: dir + "/out")
        try expectMerged(dir + "/out")
        #expect(config == ImageConfig(entrypoint: ["/bin/tini", "--"], cmd: ["sh"], env: ["PATH=/bin", "A=b=c"], workingDir: "/srv", user: "1000"))
        #expect(config.command([]) == ["/bin/tini", "--", "sh"])
        #expect(config.command(["echo", "hi"]) == ["/bin/tini", "--", "echo", "hi"], "arguments replace Cmd, not the entrypoint")
        // A manifest naming a configuration the tarball lacks is a broken image.
        try write(img + "/manifest.json", #"[{"Config":"missing.json","Layers":["aaa/layer.tar"]}]"#)
        try ProcessRunner.check(["tar", "-C", img, "-cf", dir + "/broken.tar", "."])
        let e = try #require(throws: MicroVMError.self) { try RootfsSource.extract(tarball: dir + "/broken.tar", into: dir + "/out2") }
        #expect(e.message.contains("missing.json"))
    }

    @Test func ociImageLayout() throws {
        let (l1, l2) = try makeLayers()
        let img = dir + "/oci"
        let blobs = img + "/blobs/sha256"
        try FileManager.default.createDirectory(atPath: blobs, withIntermediateDirectories: true)
        let d1 = String(repeating: "1", count: 64), d2 = String(repeating: "2", count: 64), dm = String(repeating: "f", count: 64)
        try FileManager.default.copyItem(atPath: l1, toPath: blobs + "/" + d1)
        try FileManager.default.copyItem(atPath: l2, toPath: blobs + "/" + d2)
        let dc = String(repeating: "c", count: 64)
        try write(blobs + "/" + dc, #"{"config":{"Cmd":null,"Entrypoint":["/bin/echo"],"Env":null}}"#)
        try write(blobs + "/" + dm, #"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:\#(dc)"},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:\#(d1)"},{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:\#(d2)"}]}"#)
        try write(img + "/index.json", #"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:\#(dm)"}]}"#)
        try write(img + "/oci-layout", #"{"imageLayoutVersion":"1.0.0"}"#)
        try ProcessRunner.check(["tar", "-C", img, "-cf", dir + "/oci.tar", "."])
        let config = try RootfsSource.extract(tarball: dir + "/oci.tar", into: dir + "/out")
        try expectMerged(dir + "/out")
        #expect(config == ImageConfig(entrypoint: ["/bin/echo"]), "null fields are empty")
    }

    @Test func configurationsThatCannotRunAreRefused() {
        for (json, complaint) in [(#"{"config":{"Env":["NOEQUALS"]}}"#, "not NAME=VALUE"), (#"{"config":{"WorkingDir":"srv"}}"#, "not an absolute path"),
                                  (#"{"config":{"Cmd":"sh"}}"#, "not an image configuration"), (#"[]"#, "not an image configuration")] {
            let e = #expect(throws: MicroVMError.self) { try ImageConfig(json: Data(json.utf8)) }
            #expect(e?.message.contains(complaint) == true, "\(json): \(e?.message ?? "")")
        }
    }

    @Test func hostileManifestsAreRefused() throws {
        let img = dir + "/bad"
        try write(img + "/manifest.json", #"[{"Layers":["../../etc/passwd"]}]"#)
        #expect(throws: MicroVMError.self) { try RootfsSource.layers(inImageDirectory: img) }
        try write(dir + "/bad2/index.json", #"{"manifests":[{"digest":"sha256:../../x"}]}"#)
        #expect(throws: MicroVMError.self) { try RootfsSource.layers(inImageDirectory: dir + "/bad2") }
        try FileManager.default.createDirectory(atPath: dir + "/empty", withIntermediateDirectories: true)
        #expect(throws: MicroVMError.self) { try RootfsSource.layers(inImageDirectory: dir + "/empty") }
        #expect(throws: MicroVMError.self) { try RootfsSource.extract(tarball: dir + "/none.tar", into: dir + "/o") }
    }
}
