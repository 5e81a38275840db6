import Foundation
import Testing
@testable import Images

/// A launch finds the image key without reading the package database: the key is remembered
/// with a fingerprint of what it depends on, and any change to those files forgets it.
@Suite struct ImageKeyCacheTests {
    @Test func theKeyHoldsUntilAWatchedFileChanges() throws {
        let dir = NSTemporaryDirectory() + "mvm-keycache-\(getpid())-\(UUID().uuidString.prefix(6))"
        try FileManager.default.createDirectory(atPath: dir + "/images/probe", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let status = dir + "/status", initScript = dir + "/images/init"
        try "Package: a\n".write(toFile: status, atomically: true, encoding: .utf8)
        try "#!/bin/sh\n".write(toFile: initScript, atomically: true, encoding: .utf8)
        let cache = ImageKeyCache(path: dir + "/key.json", initScript: initScript, watched: [status])
        #expect(cache.lookup() == nil)
        cache.remember("debian-x-1234", fingerprint: cache.fingerprint())
        #expect(cache.lookup() == "debian-x-1234")
        // A package installed or upgraded rewrites dpkg's status file.
        try "Package: a\nPackage: b\n".write(toFile: status, atomically: true, encoding: .utf8)
        #expect(cache.lookup() == nil)
        cache.remember("debian-x-5678", fingerprint: cache.fingerprint())
        #expect(cache.lookup() == "debian-x-5678")
        // A new probe source changes the recipe.
        try "int main(void){return 0;}\n".write(toFile: dir + "/images/probe/p.c", atomically: true, encoding: .utf8)
        #expect(cache.lookup() == nil)
    }

    @Test func dpkgStatusIsReadLikeDpkgQuery() {
        let text = """
            Package: fio
            Status: install ok installed
            Version: 3.33-3

            Package: socat
            Status: deinstall ok config-files
            Version: 1.7.4.4-2

            Package: libc6
            Status: install ok installed
            Architecture: amd64
            Version: 2.36-9+deb12u9

            Package: other
            Status: install ok installed
            Version: 1
            """
        #expect(DpkgStatus.parse(text, packages: ["fio", "socat", "libc6"]) == ["fio=3.33-3", "libc6=2.36-9+deb12u9"])
    }
}
