import CLibvirt
import CLazyLibs
import Foundation
import MicroVMCore

/// An open libvirt connection; closed when the last reference goes.
///
/// libvirt connections are thread-safe (every public call takes the object's lock), which is
/// what makes sharing one across tasks sound.
public final class LibvirtConnection: @unchecked Sendable {
    let pointer: virConnectPtr
    public let uri: String

    private init(pointer: virConnectPtr, uri: String) { self.pointer = pointer; self.uri = uri }

    deinit { virConnectClose(pointer) }

    /// Opens `uri`: `qemu:///embed?root=DIR`, `qemu:///system`, `qemu:///session`,
    /// `qemu+ssh://HOST/system`, `test:///default`. Remote transports get libvirt's default
    /// authentication callback so ssh/SASL prompts work.
    public static func open(_ uri: String) throws -> LibvirtConnection {
        try checkURI(uri)
        // An embedded driver's root holds its log, as it holds QEMU's.
        let root = uri.hasPrefix("qemu:///embed") ? URLComponents(string: uri)?.queryItems?.first { $0.name == "root" }?.value : nil
        try LibvirtRuntime.start(logFile: root.map { $0 + "/log/libvirt.log" })
        let ptr: virConnectPtr?
        if uri.contains("+") {
            // SAFETY: virConnectAuthPtrDefault is libvirt's static default callback table.
            ptr = virConnectOpenAuth(uri, mvm_lazy_libvirt_default_auth().assumingMemoryBound(to: virConnectAuth.self), 0)
        } else {
            ptr = virConnectOpen(uri)
        }
        guard let ptr else { throw openError(uri: uri, failure: LibvirtFailure.last()) }
        return LibvirtConnection(pointer: ptr, uri: uri)
    }

    static let drivers: Set<String> = ["qemu", "test", "lxc", "xen", "libxl", "vbox", "vmwareplayer", "vmwarews", "vmwarefusion",
                                       "esx", "gsx", "vpx", "hyperv", "openvz", "bhyve", "vz", "parallels", "ch", "remote"]
    static let transports: Set<String> = ["unix", "ssh", "libssh", "libssh2", "tcp", "tls", "ext"]

    /// Rejects what libvirt would otherwise hand to its remote driver, which then reports a
    /// missing daemon socket instead of the real mistake: an unknown driver or transport.
    static func checkURI(_ uri: String) throws {
        let usage = "use qemu:///embed?root=DIR, qemu:///system, qemu:///session, qemu+ssh://HOST/system or test:///default"
        guard let c = URLComponents(string: uri), let scheme = c.scheme?.lowercased(), !scheme.isEmpty else {
            throw MicroVMError.invalidArgument("'\(uri)' is not a libvirt URI: \(usage)")
        }
        let parts = scheme.split(separator: "+", maxSplits: 1).map(String.init)
        guard drivers.contains(parts[0]), parts.count == 1 || transports.contains(parts[1]) else {
            throw MicroVMError.invalidArgument("'\(uri)' names no libvirt driver ('\(scheme)' is unknown): \(usage)")
        }
        if parts[0] == "qemu", parts.count == 1, (c.host ?? "").isEmpty, !["/system", "/session", "/embed"].contains(c.path) {
            throw MicroVMError.invalidArgument("'\(uri)': a local QEMU URI ends in /system, /session or /embed: \(usage)")
        }
    }

    /// One clear error per way an open fails: a URI no driver accepts, a daemon that does not
    /// answer, an embedded root held by another process.
    static func openError(uri: String, failure: LibvirtFailure) -> MicroVMError {
        let m = failure.message
        if m.contains("no connection driver available") || m.contains("parse") && m.contains("URI") || failure.is(VIR_ERR_INVALID_ARG) {
            return MicroVMError(.invalidArgument, "'\(uri)' is not a libvirt URI this host can open (\(m)): use qemu:///embed?root=DIR, qemu:///system, qemu:///session, qemu+ssh://HOST/system or test:///default")
        }
        if m.contains("acquire pid file") {
            return MicroVMError(.backend, "cannot open \(uri): another process is using this embedded libvirt root (\(m)). Wait for that mvm run to finish, or use --connect qemu:///system")
        }
        if uri.contains("embed") {
            return MicroVMError(.backend, "cannot open \(uri): \(m). Check that the root directory is writable and that etc/qemu.conf in it is valid")
        }
        if uri.contains("+ssh") {
            return MicroVMError(.backend, "cannot connect to \(uri): \(m). Check that 'ssh HOST' logs in without a password prompt and that libvirtd runs on that host")
        }
        if uri.hasPrefix("test:") {
            return failure.error("cannot open \(uri)")
        }
        return MicroVMError(.backend, "cannot connect to \(uri): \(m). Is libvirtd running? (mkdir -p /var/log/libvirt /run/libvirt && virtlogd -d && libvirtd -d)")
    }

    /// libvirt's version as major.minor.micro.
    public var libraryVersion: String {
        var v: UInt = 0
        guard virConnectGetLibVersion(pointer, &v) == 0 else { return "unknown" }
        return "\(v / 1_000_000).\(v / 1000 % 1000).\(v % 1000)"
    }

    /// Starts a transient domain: it disappears from libvirt once it stops, so a crash of this
    /// process cannot leave a definition behind.
    public func createTransient(xml: String) throws -> LibvirtDomain {
        guard let d = virDomainCreateXML(pointer, xml, 0) else {
            throw LibvirtFailure.last().error("libvirt refused to start the domain")
        }
        return LibvirtDomain(pointer: d, connection: self)
    }

    /// Defines a persistent domain (started later with `LibvirtDomain.start()`).
    public func define(xml: String) throws -> LibvirtDomain {
        guard let d = virDomainDefineXML(pointer, xml) else {
            throw LibvirtFailure.last().error("libvirt refused the domain definition")
        }
        return LibvirtDomain(pointer: d, connection: self)
    }

    /// The domain called `name`, or nil when there is none.
    public func lookup(name: String) throws -> LibvirtDomain? {
        guard let d = virDomainLookupByName(pointer, name) else {
            let f = LibvirtFailure.last()
            if f.is(VIR_ERR_NO_DOMAIN) { return nil }
            throw f.error("cannot look up domain '\(name)' on \(uri)")
        }
        return LibvirtDomain(pointer: d, connection: self)
    }

    /// Every domain, active and defined.
    public func listDomains() throws -> [LibvirtDomain] {
        var list: UnsafeMutablePointer<virDomainPtr?>?
        let n = virConnectListAllDomains(pointer, &list, 0)
        guard n >= 0, let list else { throw LibvirtFailure.last().error("cannot list domains on \(uri)") }
        // SAFETY: libvirt returned an array of n domain references that we now own, plus the array itself.
        defer { free(list) }
        return (0..<Int(n)).compactMap { i in list[i].map { LibvirtDomain(pointer: $0, connection: self) } }
    }

    /// libvirt's domain capabilities document for a machine type and virtualization type
    /// (`kvm` or `qemu`), or nil when the combination is not supported.
    public func domainCapabilities(machine: String, virtType: String, arch: String = "x86_64") -> String? {
        guard let p = virConnectGetDomainCapabilities(pointer, nil, arch, machine, virtType, 0) else {
            _ = LibvirtFailure.last()
            return nil
        }
        defer { free(p) }
        return String(cString: p)
    }
}

/// The run state of a domain, as virDomainGetInfo reports it.
public enum DomainState: String, Sendable, Codable {
    case none, running, blocked, paused, shutdown, shutoff, crashed, suspended, unknown

    init(raw: UInt8) {
        switch Int32(raw) {
        case Int32(VIR_DOMAIN_NOSTATE.rawValue): self = .none
        case Int32(VIR_DOMAIN_RUNNING.rawValue): self = .running
        case Int32(VIR_DOMAIN_BLOCKED.rawValue): self = .blocked
        case Int32(VIR_DOMAIN_PAUSED.rawValue): self = .paused
        case Int32(VIR_DOMAIN_SHUTDOWN.rawValue): self = .shutdown
        case Int32(VIR_DOMAIN_SHUTOFF.rawValue): self = .shutoff
        case Int32(VIR_DOMAIN_CRASHED.rawValue): self = .crashed
        case Int32(VIR_DOMAIN_PMSUSPENDED.rawValue): self = .suspended
        default: self = .unknown
        }
    }

    public var isActive: Bool { ![.shutoff, .crashed, .none].contains(self) }
}

/// What virDomainGetInfo says about a domain.
public struct DomainInfo: Sendable {
    public var state: DomainState
    public var maxMemory: ByteCount
    public var memory: ByteCount
    public var vcpus: Int
    /// CPU time used by the domain, in nanoseconds.
    public var cpuTime: UInt64
}

/// Counters for the benchmark: CPU time, memory, block and network I/O of one domain.
public struct DomainStats: Sendable, Codable {
    public var cpuTimeNanoseconds: UInt64
    public var memory: ByteCount
    /// Resident memory of the QEMU process as libvirt sees it (nil when not reported).
    public var rss: ByteCount?
    /// What the guest reports through a balloon (nil without one).
    public var balloonAvailable: ByteCount?
    public var balloonUnused: ByteCount?
    public var blockReadBytes: Int64
    public var blockWriteBytes: Int64
    public var blockReadRequests: Int64
    public var blockWriteRequests: Int64
    public var netRxBytes: Int64
    public var netTxBytes: Int64
}

/// A reference to a libvirt domain; freed (not destroyed) when the last Swift reference goes.
public final class LibvirtDomain: @unchecked Sendable {
    let pointer: virDomainPtr
    /// Kept so the connection outlives every domain reference made from it.
    public let connection: LibvirtConnection

    init(pointer: virDomainPtr, connection: LibvirtConnection) { self.pointer = pointer; self.connection = connection }

    deinit { virDomainFree(pointer) }

    public var name: String {
        // SAFETY: virDomainGetName returns a string owned by the domain object, valid while we hold it.
        virDomainGetName(pointer).map { String(cString: $0) } ?? "?"
    }

    public var uuid: String {
        var buf = [CChar](repeating: 0, count: 64)
        guard virDomainGetUUIDString(pointer, &buf) == 0 else { return "" }
        return String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    public func info() throws -> DomainInfo {
        var i = virDomainInfo()
        guard virDomainGetInfo(pointer, &i) == 0 else { throw LibvirtFailure.last().error("cannot read the state of domain '\(name)'") }
        return DomainInfo(state: DomainState(raw: i.state), maxMemory: .kibibytes(UInt64(i.maxMem)), memory: .kibibytes(UInt64(i.memory)),
                          vcpus: Int(i.nrVirtCpu), cpuTime: i.cpuTime)
    }

    /// The state, or shutoff once libvirt no longer knows the domain (a transient one that stopped).
    public func state() -> DomainState {
        var i = virDomainInfo()
        guard virDomainGetInfo(pointer, &i) == 0 else { _ = LibvirtFailure.last(); return .shutoff }
        return DomainState(raw: i.state)
    }

    public func start() throws {
        guard virDomainCreate(pointer) == 0 else { throw LibvirtFailure.last().error("cannot start domain '\(name)'") }
    }

    /// Asks the guest to shut down (ACPI power button); returns at once.
    public func shutdown() throws {
        guard virDomainShutdown(pointer) == 0 else { throw LibvirtFailure.last().error("cannot ask domain '\(name)' to shut down") }
    }

    /// Pulls the plug. A domain that is already gone counts as destroyed.
    public func destroy() throws {
        guard virDomainDestroy(pointer) == 0 else {
            let f = LibvirtFailure.last()
            if f.is(VIR_ERR_NO_DOMAIN) || f.is(VIR_ERR_OPERATION_INVALID) { return }
            throw f.error("cannot destroy domain '\(name)'")
        }
    }

    /// Removes a persistent definition; a transient domain that already vanished is fine.
    public func undefine() throws {
        guard virDomainUndefine(pointer) == 0 else {
            let f = LibvirtFailure.last()
            if f.is(VIR_ERR_NO_DOMAIN) { return }
            throw f.error("cannot undefine domain '\(name)'")
        }
    }

    public func xmlDescription() throws -> String {
        guard let p = virDomainGetXMLDesc(pointer, 0) else { throw LibvirtFailure.last().error("cannot read the XML of domain '\(name)'") }
        defer { free(p) }
        return String(cString: p)
    }

    /// CPU, memory, block and network counters. Block and network devices are named as in the
    /// domain XML (`vda`, the tap's name); a device the driver cannot report on reads as zero.
    public func stats(blockDevices: [String] = ["vda"], interfaces: [String] = []) throws -> DomainStats {
        let i = try info()
        var s = DomainStats(cpuTimeNanoseconds: i.cpuTime, memory: i.memory, rss: nil, balloonAvailable: nil, balloonUnused: nil,
                            blockReadBytes: 0, blockWriteBytes: 0, blockReadRequests: 0, blockWriteRequests: 0, netRxBytes: 0, netTxBytes: 0)
        let mem = memoryStatistics()
        s.rss = mem[Int32(VIR_DOMAIN_MEMORY_STAT_RSS.rawValue)].map { .kibibytes($0) }
        s.balloonAvailable = mem[Int32(VIR_DOMAIN_MEMORY_STAT_AVAILABLE.rawValue)].map { .kibibytes($0) }
        s.balloonUnused = mem[Int32(VIR_DOMAIN_MEMORY_STAT_UNUSED.rawValue)].map { .kibibytes($0) }
        for dev in blockDevices {
            var b = virDomainBlockStatsStruct()
            if virDomainBlockStats(pointer, dev, &b, MemoryLayout<virDomainBlockStatsStruct>.size) == 0 {
                s.blockReadBytes += max(0, b.rd_bytes); s.blockWriteBytes += max(0, b.wr_bytes)
                s.blockReadRequests += max(0, b.rd_req); s.blockWriteRequests += max(0, b.wr_req)
            } else { _ = LibvirtFailure.last() }
        }
        for dev in interfaces {
            var n = virDomainInterfaceStatsStruct()
            if virDomainInterfaceStats(pointer, dev, &n, MemoryLayout<virDomainInterfaceStatsStruct>.size) == 0 {
                s.netRxBytes += max(0, n.rx_bytes); s.netTxBytes += max(0, n.tx_bytes)
            } else { _ = LibvirtFailure.last() }
        }
        return s
    }

    /// Sets the running guest's memory through its balloon (`virDomainSetMemoryFlags`, live):
    /// at most the memory it booted with.
    public func setLiveMemory(_ memory: ByteCount) throws {
        guard virDomainSetMemoryFlags(pointer, UInt(memory.kibibytes), UInt32(VIR_DOMAIN_AFFECT_LIVE.rawValue)) == 0 else {
            throw LibvirtFailure.last().error("cannot set the memory of domain '\(name)' to \(memory)")
        }
    }

    /// Plugs vCPUs in or out of the running guest (`virDomainSetVcpusFlags`, live), up to the
    /// slots it booted with.
    public func setLiveVCPUs(_ count: Int) throws {
        guard virDomainSetVcpusFlags(pointer, UInt32(count), UInt32(VIR_DOMAIN_AFFECT_LIVE.rawValue)) == 0 else {
            throw LibvirtFailure.last().error("cannot set the vCPUs of domain '\(name)' to \(count)")
        }
    }

    /// The balloon's figures as libvirt reads them from QEMU (`virDomainMemoryStats`), by
    /// libvirt's tag: KiB for sizes, counts for faults.
    public func memoryStatistics() -> [Int32: UInt64] {
        var mem = [virDomainMemoryStatStruct](repeating: virDomainMemoryStatStruct(), count: Int(VIR_DOMAIN_MEMORY_STAT_NR.rawValue))
        let n = virDomainMemoryStats(pointer, &mem, UInt32(mem.count), 0)
        if n < 0 { _ = LibvirtFailure.last(); return [:] }
        var out: [Int32: UInt64] = [:]
        for m in mem.prefix(Int(n)) { out[Int32(m.tag)] = m.val }
        return out
    }

    /// Calls `handler(event, detail)` from libvirt's event loop thread on every lifecycle event
    /// of this domain, until the returned registration is cancelled.
    public func watchLifecycle(_ handler: @escaping @Sendable (_ event: Int32, _ detail: Int32) -> Void) throws -> LifecycleWatch {
        let box = Unmanaged.passRetained(LifecycleBox(handler))
        // SAFETY: libvirt calls the lifecycle callback with the lifecycle signature for this event
        // id; the generic type is only how the C API spells "any callback".
        let cb = unsafeBitCast(lifecycleTrampoline, to: virConnectDomainEventGenericCallback.self)
        let id = virConnectDomainEventRegisterAny(connection.pointer, pointer, Int32(VIR_DOMAIN_EVENT_ID_LIFECYCLE.rawValue),
                                                  cb, box.toOpaque(), releaseLifecycleBox)
        guard id >= 0 else {
            box.release()
            throw LibvirtFailure.last().error("cannot watch lifecycle events of domain '\(name)'")
        }
        return LifecycleWatch(connection: connection, id: id)
    }
}

/// A lifecycle event registration; deregistered on `cancel()` or when released.
public final class LifecycleWatch: @unchecked Sendable {
    private let connection: LibvirtConnection
    private let lock = NSLock()
    private var id: Int32?

    init(connection: LibvirtConnection, id: Int32) { self.connection = connection; self.id = id }

    public func cancel() {
        lock.lock(); let current = id; id = nil; lock.unlock()
        if let current, virConnectDomainEventDeregisterAny(connection.pointer, current) != 0 { _ = LibvirtFailure.last() }
    }

    deinit { cancel() }
}

private final class LifecycleBox: Sendable {
    let handler: @Sendable (Int32, Int32) -> Void
    init(_ handler: @escaping @Sendable (Int32, Int32) -> Void) { self.handler = handler }
}

private let lifecycleTrampoline: @convention(c) (virConnectPtr?, virDomainPtr?, Int32, Int32, UnsafeMutableRawPointer?) -> Int32 = { _, _, event, detail, opaque in
    guard let opaque else { return 0 }
    // SAFETY: opaque is the retained LifecycleBox passed at registration; libvirt releases it only through releaseLifecycleBox.
    Unmanaged<LifecycleBox>.fromOpaque(opaque).takeUnretainedValue().handler(event, detail)
    return 0
}

private let releaseLifecycleBox: @convention(c) (UnsafeMutableRawPointer?) -> Void = { opaque in
    guard let opaque else { return }
    // SAFETY: balances the passRetained in watchLifecycle; libvirt calls this once per registration.
    Unmanaged<LifecycleBox>.fromOpaque(opaque).release()
}
