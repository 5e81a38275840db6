import Foundation
import MicroVMCore
import Testing
@testable import Images

@Suite("kernel modules")
struct ModuleTests {
    /// A small fake /lib/modules/VERSION with compressed modules, a softdep and an alias.
    func fakeTree() throws -> String {
        let dir = try Fixture.tempDir("mods")
        let dep = """
            kernel/a.ko.xz: kernel/b.ko kernel/c-d.ko.zst
            kernel/b.ko: kernel/c-d.ko.zst
            kernel/c-d.ko.zst:
            kernel/fs.ko: kernel/b.ko
            kernel/crc_generic.ko:
            kernel/crc_fast.ko:

            """
        try Data(dep.utf8).write(to: URL(fileURLWithPath: dir + "/modules.dep"))
        try Data("softdep fs pre: crypto-crc\n".utf8).write(to: URL(fileURLWithPath: dir + "/modules.softdep"))
        try Data("alias crypto-crc crc_fast\nalias crypto-crc crc_generic\n".utf8).write(to: URL(fileURLWithPath: dir + "/modules.alias"))
        try Data("kernel/builtin_thing.ko\n".utf8).write(to: URL(fileURLWithPath: dir + "/modules.builtin"))
        return dir
    }

    @Test func ordersDependenciesFirstAndStripsCompressionSuffixes() throws {
        let dir = try fakeTree()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = try ModuleResolver(directory: dir)
        let mods = try r.resolve(["a", "fs", "builtin-thing"])
        #expect(mods.map(\.name) == ["c_d", "b", "a", "crc_generic", "fs"])
        #expect(mods.first?.initramfsPath == "kernel/c-d.ko")
        #expect(mods.first?.sourcePath == "kernel/c-d.ko.zst")
    }

    @Test func missingModuleIsAClearError() throws {
        let dir = try fakeTree()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let e = #expect(throws: MicroVMError.self) { try ModuleResolver(directory: dir).resolve(["a", "nosuchmod"]) }
        #expect(e?.code == .notFound)
        #expect(e?.message.contains("'nosuchmod' is not in") == true)
        let e2 = #expect(throws: MicroVMError.self) { try ModuleResolver(directory: dir + "/absent") }
        #expect(e2?.message.contains("modules.dep") == true)
    }

    @Test func decompressesXZModules() throws {
        let dir = try fakeTree()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try FileManager.default.createDirectory(atPath: dir + "/kernel", withIntermediateDirectories: true)
        let payload = Data("\u{7f}ELF module bytes".utf8)
        let xz = try ProcessRunner.check(["xz", "-c"], input: payload, timeout: 30).stdout
        try xz.write(to: URL(fileURLWithPath: dir + "/kernel/a.ko.xz"))
        let r = try ModuleResolver(directory: dir)
        let a = try #require(try r.resolve(["a"]).last)
        #expect(try r.contents(of: a) == payload)
    }

    @Test(.enabled(if: Fixture.haveKernel, "no Debian kernel (apt-get install linux-image-amd64)"))
    func realKernelClosureMatchesModulesDep() throws {
        let k = try DebianKernel.newest()
        let r = try ModuleResolver(directory: k.modulesDirectory)
        let mods = try r.resolve(ModuleResolver.defaultModules)
        let paths = mods.map(\.sourcePath)
        #expect(Set(paths).count == paths.count)
        for (i, p) in paths.enumerated() {
            for dep in r.depsByPath[p] ?? [] {
                let j = try #require(paths.firstIndex(of: dep), "\(dep) (needed by \(p)) is missing")
                #expect(j < i, "\(dep) must load before \(p)")
            }
        }
        let names = Set(mods.map(\.name))
        for want in ["virtio_mmio", "virtio_pci", "virtio_blk", "virtio_net", "virtio_rng", "vmw_vsock_virtio_transport",
                     "vsock", "ext4", "jbd2", "mbcache", "crc16", "crc32c_generic", "9p", "9pnet", "9pnet_virtio", "netfs", "fscache"] {
            #expect(names.contains(want), "\(want) missing")
        }
    }
}
