import Foundation
import Testing
@testable import Libvirt
import Host
import MicroVMCore

/// The bindings against libvirt's in-process test driver: no QEMU, every call real.
@Suite("libvirt test driver")
struct TestDriverTests {
    /// A minimal definition the test driver accepts (its domain type is `test`).
    static func xml(_ name: String) -> String {
        XMLTree("domain", ["type": "test"]) {
            XMLTree("name", text: name)
            XMLTree("memory", ["unit": "KiB"], text: "131072")
            XMLTree("vcpu", text: "1")
            XMLTree("os") { XMLTree("type", ["arch": "x86_64"], text: "hvm") }
        }.rendered()
    }

    @Test func defineStartListDestroyUndefine() throws {
        let conn = try LibvirtConnection.open("test:///default")
        let name = "mvm-t-\(UUID().uuidString.prefix(8))"
        let d = try conn.define(xml: Self.xml(name))
        #expect(d.name == name)
        #expect(d.state() == .shutoff)
        try d.start()
        #expect(d.state() == .running)
        #expect(try conn.listDomains().map(\.name).contains(name))
        let info = try d.info()
        #expect(info.vcpus == 1)
        #expect(info.maxMemory == .mebibytes(128))
        #expect(try d.xmlDescription().contains("<name>\(name)</name>"))
        try d.destroy()
        #expect(d.state() == .shutoff)
        try d.undefine()
        #expect(try conn.lookup(name: name) == nil)
        #expect(!(try conn.listDomains().map(\.name).contains(name)))
    }

    @Test func lifecycleEventsArriveThroughTheEventLoop() async throws {
        let conn = try LibvirtConnection.open("test:///default")
        let name = "mvm-ev-\(UUID().uuidString.prefix(8))"
        let d = try conn.define(xml: Self.xml(name))
        defer { try? d.destroy(); try? d.undefine() }
        let seen = EventLog()
        let watch = try d.watchLifecycle { event, _ in seen.append(event) }
        try d.start()
        try d.destroy()
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline, !seen.events.contains(5) { try await Task.sleep(for: .milliseconds(20)) }
        watch.cancel()
        #expect(seen.events.contains(2), "VIR_DOMAIN_EVENT_STARTED")
        #expect(seen.events.contains(5), "VIR_DOMAIN_EVENT_STOPPED")
    }

    @Test func transientDomainVanishesWhenDestroyed() throws {
        let conn = try LibvirtConnection.open("test:///default")
        let name = "mvm-tr-\(UUID().uuidString.prefix(8))"
        let d = try conn.createTransient(xml: Self.xml(name))
        #expect(try conn.lookup(name: name) != nil)
        try d.destroy()
        #expect(try conn.lookup(name: name) == nil)
        try d.destroy()  // already gone: not an error
    }

    @Test func brokenXMLIsAClearError() throws {
        let conn = try LibvirtConnection.open("test:///default")
        let e = try #require(throws: MicroVMError.self) { try conn.define(xml: "<domain type='test'><name>x") }
        #expect(e.message.contains("libvirt refused"))
        let e2 = try #require(throws: MicroVMError.self) { try conn.define(xml: "<domain type='test'><name>no-os</name></domain>") }
        #expect(!e2.message.isEmpty)
    }

    @Test func duplicateNameIsRefused() throws {
        let conn = try LibvirtConnection.open("test:///default")
        let name = "mvm-dup-\(UUID().uuidString.prefix(8))"
        let d = try conn.createTransient(xml: Self.xml(name))
        defer { try? d.destroy() }
        #expect(throws: MicroVMError.self) { try conn.createTransient(xml: Self.xml(name)) }
    }

    @Test func invalidURIIsOneClearError() throws {
        for uri in ["bogus-driver:///nothing", "qemu+carrier-pigeon://host/system", "qemu:///bogus", "::bad uri", ""] {
            let e = try #require(throws: MicroVMError.self, "\(uri)") { try LibvirtConnection.open(uri) }
            #expect(e.code == .invalidArgument, "\(uri)")
            #expect(e.message.contains("qemu:///system"), "the error lists URIs that work: \(e.message)")
        }
        // Past our own check, libvirt's parser has the last word.
        let e = try #require(throws: MicroVMError.self) { try LibvirtConnection.open("test:///nonexistent/mvm-test-driver.xml") }
        #expect(e.message.contains("nonexistent"))
    }

    @Test func unreachableDaemonSaysWhatToDo() throws {
        let e = try #require(throws: MicroVMError.self) { try LibvirtConnection.open("qemu+unix:///system?socket=/nonexistent/libvirt-sock") }
        #expect(e.code == .backend)
        #expect(e.message.contains("libvirtd"))
        #expect(e.message.contains("/nonexistent"))
    }

    @Test func hostedBackendReportsAMissingInstance() async throws {
        let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("mvm-lv-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: tmp) }
        let backend = HostedBackend(connect: "test:///default", paths: Paths(state: tmp, cache: tmp))
        #expect(try await backend.list().isEmpty)
        await #expect(throws: MicroVMError.self) { try await backend.stop(name: "nope") }
        await #expect(throws: MicroVMError.self) { try await backend.logs(name: "nope") }
        #expect(backend.qemuPid(name: "nope") == nil)
    }

    @Test func missingKernelIsAClearError() async throws {
        let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("mvm-lv-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: tmp) }
        let backend = HostedBackend(connect: "test:///default", paths: Paths(state: tmp, cache: tmp), attachRootfs: false)
        let e = try await #require(throws: MicroVMError.self) { try await backend.run(VMSpec(kernel: "/nonexistent/vmlinuz")) }
        #expect(e.code == .notFound)
        #expect(e.message.contains("/nonexistent/vmlinuz"))
        let failing = HostedBackend(connect: "test:///default", paths: Paths(state: tmp, cache: tmp),
                                    image: { throw MicroVMError.notFound("no image here") })
        let e2 = try await #require(throws: MicroVMError.self) { try await failing.run(VMSpec()) }
        #expect(e2.message.contains("no image here"))
    }

    @Test func embeddedURIGetsTheStateRoot() {
        let p = Paths(state: "/s", cache: "/c")
        // Short, for QEMU's socket paths under it, where the roots may be anyone's (root's), else in the state directory.
        #expect(EmbeddedRoots.directory(p) == (getuid() == 0 ? "/run/microvm/libvirt" : "/s/libvirt/roots"))
        let own = EmbeddedRoots.directory(p) + "/\(getpid())-\(ProcessIdentity.startTime(pid: getpid()) ?? 0)"
        #expect(HostedBackend.expand("qemu:///embed", paths: p) == "qemu:///embed?root=" + own)
        #expect(HostedBackend.expand("qemu:///system", paths: p) == "qemu:///system")
        #expect(HostedBackend(paths: p).embeddedRoot == own)
        #expect(HostedBackend(connect: "qemu:///system", paths: p).embeddedRoot == nil)
    }

    @Test func embeddedQemuConfOnlyDropsNamespacesInTheRig() throws {
        let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("mvm-lv-\(UUID().uuidString.prefix(8))").path
        defer { try? FileManager.default.removeItem(atPath: tmp) }
        try HostedBackend.prepareEmbeddedRoot(tmp, inRig: false)
        let plain = try String(contentsOfFile: tmp + "/etc/qemu.conf", encoding: .utf8)
        #expect(plain.contains("stdio_handler = \"file\"") && !plain.contains("namespaces"))
        try HostedBackend.prepareEmbeddedRoot(tmp, inRig: true)
        let rig = try String(contentsOfFile: tmp + "/etc/qemu.conf", encoding: .utf8)
        #expect(rig.contains("namespaces = []") && rig.contains("stdio_handler = \"file\""))
    }
}

final class EventLog: @unchecked Sendable {
    private let lock = NSLock()
    private var list: [Int32] = []
    func append(_ e: Int32) { lock.lock(); list.append(e); lock.unlock() }
    var events: [Int32] { lock.lock(); defer { lock.unlock() }; return list }
}

/// The hosted backend's console follower against a guest that prints without pause: its time-out
/// still ends the run, and the console it keeps stays bounded.
@Suite("hosted console follower", .timeLimit(.minutes(1)))
struct HostedFollowTests {
    @Test func aGuestThatNeverStopsPrintingStillTimesOut() async throws {
        let conn = try LibvirtConnection.open("test:///default")
        let name = "mvm-f-\(UUID().uuidString.prefix(8))"
        let d = try conn.define(xml: TestDriverTests.xml(name))
        try d.start()
        defer { try? d.destroy(); try? d.undefine() }
        // The console is a FIFO fed without pause until the follower has returned: a follower
        // that looked at the clock only when a read came back empty would never return. A FIFO,
        // not a file, so the flood costs no disk.
        let log = FileManager.default.temporaryDirectory.path + "/\(name).fifo"
        try #require(mkfifo(log, 0o600) == 0)
        defer { unlink(log) }
        signal(SIGPIPE, SIG_IGN)
        let done = StopFlag()
        let writer = Thread {
            let fd = open(log, O_WRONLY)
            guard fd >= 0 else { return }
            defer { close(fd) }
            let line = [UInt8](repeating: 0x78, count: 4095) + [10]
            while !done.isSet {
                if line.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) < 0 { return }
            }
        }
        writer.start()
        defer { done.set() }
        let backend = HostedBackend(connect: "test:///default")
        await #expect {
            _ = try await backend.follow(domain: d, log: log, clock: LaunchClock(), timeout: 1, stopped: StopFlag())
        } throws: { e in
            (e as? MicroVMError)?.code == .timeout
        }
    }
}
