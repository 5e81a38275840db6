import Foundation
import MicroVMCore
import Testing
@testable import Images

@Suite("image store", .serialized, .enabled(if: Fixture.canBuild, "needs a Debian kernel (apt-get install linux-image-amd64), busybox-static and e2fsprogs"), .timeLimit(.minutes(10)))
struct ImageStoreTests {
    @Test func defaultImageHasEveryArtifact() throws {
        let img = try Fixture.image()
        let fm = FileManager.default
        for p in [img.kernel, img.vmlinux, img.initrd, img.rootfsDisk, img.rootfsTarball] {
            #expect(fm.fileExists(atPath: p), "\(p) missing")
        }
        #expect(img.kernelVersion == (try DebianKernel.newest()).version)
        let head = try #require(FileHandle(forReadingAtPath: img.vmlinux)).readData(ofLength: 5)
        #expect(head == Data([0x7f, 0x45, 0x4c, 0x46, 2]))
        // Debian's kernel is built with CONFIG_PVH=y.
        #expect(img.hasPVHNote)
        for tool in ["sysbench", "stress-ng", "fio", "iperf3", "busybox"] {
            #expect(fm.isExecutableFile(atPath: img.rootfsTree + "/usr/bin/" + tool), "\(tool) missing from the tree")
        }
        #expect(fm.fileExists(atPath: img.rootfsTree + "/etc/passwd"))
        // The container tree and the VM tree are the same bytes.
        #expect(fm.contentsEqual(atPath: img.rootfsTree + "/usr/bin/fio", andPath: "/usr/bin/fio"))
        let cmd = KernelCommandLine.build(command: ["echo", "a b"], extra: "mvm.ro")
        #expect(cmd.hasPrefix("console=ttyS0 "))
        #expect(cmd.contains("panic=-1"))
        #expect(cmd.contains("mvm.cmd=\(GuestProtocol.encodeCommand(["echo", "a b"]))"))
        #expect(cmd.hasSuffix(" mvm.ro"))
    }

    @Test(.enabled(if: getuid() == 0, "chroot needs root"))
    func toolsRunInsideTheTree() throws {
        let img = try Fixture.image()
        for tool in ["sysbench", "stress-ng", "fio", "iperf3"] {
            let out = try ProcessRunner.run(["chroot", img.rootfsTree, "/bin/sh", "-c", "\(tool) --version"], timeout: 30)
            #expect(out.status == 0, "\(tool): \(out.stderrText)")
        }
    }

    @Test func initramfsCarriesEveryModuleWithItsDependencies() throws {
        let img = try Fixture.image()
        let k = try DebianKernel.newest()
        let entries = try InitramfsBuilder.read(img.initrd)
        var files: [String: Data] = [:]
        for e in entries { if case .file(let d) = e.kind { files[e.path] = d } }
        let order = String(decoding: try #require(files[InitramfsManifest.orderPath]), as: UTF8.self)
            .split(separator: "\n").map(String.init)
        #expect(order == img.modules.map(\.initramfsPath))
        // Compare with modules.dep read independently of the resolver.
        let dep = try String(contentsOfFile: k.modulesDirectory + "/modules.dep", encoding: .utf8)
        var deps: [String: [String]] = [:]
        for line in dep.split(separator: "\n") {
            let parts = line.split(separator: ":", maxSplits: 1)
            deps[String(parts[0])] = parts.count > 1 ? parts[1].split(separator: " ").map(String.init) : []
        }
        func plain(_ p: String) -> String { p.replacingOccurrences(of: ".ko.xz", with: ".ko").replacingOccurrences(of: ".ko.zst", with: ".ko") }
        for m in img.modules {
            let data = try #require(files["lib/modules/" + m.initramfsPath], "\(m.initramfsPath) not in the initramfs")
            #expect(data.prefix(4) == Data([0x7f, 0x45, 0x4c, 0x46]), "\(m.name) is not an uncompressed ELF object")
            let idx = try #require(order.firstIndex(of: m.initramfsPath))
            for d in try #require(deps[m.sourcePath], "\(m.sourcePath) not in modules.dep") {
                let j = try #require(order.firstIndex(of: plain(d)), "\(d) missing for \(m.name)")
                #expect(j < idx)
            }
            // Same bytes as the kernel's own module file.
            if m.sourcePath == m.initramfsPath {
                #expect(FileManager.default.contents(atPath: k.modulesDirectory + "/" + m.sourcePath) == data)
            }
        }
        let paths = Set(entries.map(\.path))
        for p in ["init", "bin/busybox", "bin/sh", "sbin/insmod", "dev/console"] { #expect(paths.contains(p), "\(p) missing") }
    }

    @Test func secondRequestReusesTheCachedImage() throws {
        let store = Fixture.store()
        let a = try store.ensureDefault()
        let before = try FileManager.default.attributesOfItem(atPath: a.rootfsDisk)
        let b = try store.ensureDefault()
        let c = try store.build(force: false)
        let after = try FileManager.default.attributesOfItem(atPath: b.rootfsDisk)
        #expect(a == b && b == c)
        #expect(before[.systemFileNumber] as? UInt64 == after[.systemFileNumber] as? UInt64)
        #expect(before[.modificationDate] as? Date == after[.modificationDate] as? Date)
        #expect(store.list().contains { $0.key == a.key && $0.isCurrent })
    }

    @Test func concurrentCallersOnAnEmptyCacheBuildOnce() throws {
        let cache = try Fixture.tempDir("cache")
        defer { try? FileManager.default.removeItem(atPath: cache) }
        let store = ImageStore(paths: Paths(state: cache + "/state", cache: cache))
        let results = ResultBox()
        DispatchQueue.concurrentPerform(iterations: 3) { _ in
            results.add(Result { try store.ensureDefault() })
        }
        let images = try results.all.map { try $0.get() }
        #expect(images.count == 3)
        #expect(Set(images.map(\.directory)).count == 1)
        let names = try FileManager.default.contentsOfDirectory(atPath: store.paths.images).sorted()
        // One image directory, the lock file and the remembered key; no leftover build directories.
        #expect(names == [".key-cache.json", ".lock", images[0].key])

        // A stale image and a dead builder's leftovers go; the current image stays.
        let fm = FileManager.default
        let stale = store.paths.images + "/debian-old-0000"
        try fm.copyItem(atPath: images[0].directory + "/manifest.json", toPath: store.paths.images + "/manifest.tmp")
        try fm.createDirectory(atPath: stale, withIntermediateDirectories: true)
        try fm.moveItem(atPath: store.paths.images + "/manifest.tmp", toPath: stale + "/manifest.json")
        try fm.createDirectory(atPath: store.paths.images + "/.build-x-1", withIntermediateDirectories: true)
        #expect(try store.prune() == ["debian-old-0000"])
        #expect(try fm.contentsOfDirectory(atPath: store.paths.images).sorted() == [".key-cache.json", ".lock", images[0].key])
        #expect(store.load(key: images[0].key) != nil)
    }
}

private final class ResultBox: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [Result<GuestImage, any Error>] = []
    func add(_ r: Result<GuestImage, any Error>) { lock.lock(); items.append(r); lock.unlock() }
    var all: [Result<GuestImage, any Error>] { lock.lock(); defer { lock.unlock() }; return items }
}
