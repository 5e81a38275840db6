import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// Point-to-point links between the host and one instance: a private /30 per link, the host at
/// `.1` and the instance at `.2`, picked from a /16 so that no address already on the host is
/// reused. Containers get a veth pair on such a link, VMs a tap device.
public enum HostLinks {
    /// The /16 that automatic links come from.
    public static let defaultPrefix = "10.200"

    /// The n-th /30 of `prefix`.0.0/16: (host, instance) addresses without the prefix length.
    public static func subnet(_ n: Int, prefix: String = defaultPrefix) -> (host: String, instance: String) {
        let base = n * 4
        return ("\(prefix).\(base / 256).\(base % 256 + 1)", "\(prefix).\(base / 256).\(base % 256 + 2)")
    }

    /// A /30 whose host address is on no interface of this host yet.
    public static func freeSubnet(prefix: String = defaultPrefix) throws -> (host: String, instance: String) {
        let used = (try? ProcessRunner.run(["ip", "-o", "-4", "addr", "show"], timeout: 10).stdoutText) ?? ""
        let start = Int.random(in: 0..<16_384)
        for i in 0..<16_384 {
            let s = subnet((start + i) % 16_384, prefix: prefix)
            if !used.contains(" \(s.host)/") { return s }
        }
        throw MicroVMError(.insufficientResources, "no free /30 left in \(prefix).0.0/16 for instance links: remove stale mvh*/mvt* interfaces")
    }

    /// Interface names hold 15 bytes, so they carry a hash of the owner's id.
    public static func interfaceTag(_ id: String) -> String {
        var h: UInt32 = 2_166_136_261
        for b in id.utf8 { h = (h ^ UInt32(b)) &* 16_777_619 }
        return cFormat("%08x", h)
    }

    /// A locally administered unicast MAC derived from `seed` (02:4d:56:xx:xx:xx, "MV"), so an
    /// instance keeps its address across runs and two instances differ.
    public static func mac(seed: String) -> [UInt8] {
        var h: UInt32 = 2_166_136_261
        for b in seed.utf8 { h = (h ^ UInt32(b)) &* 16_777_619 }
        return [0x02, 0x4d, 0x56, UInt8(truncatingIfNeeded: h >> 16), UInt8(truncatingIfNeeded: h >> 8), UInt8(truncatingIfNeeded: h)]
    }

    public static func format(mac: [UInt8]) -> String { mac.map { cFormat("%02x", $0) }.joined(separator: ":") }

    /// Runs `ip ARGS`; a failure names the command and what the host needs.
    public static func ip(_ args: [String], purpose: String = "instance networking") throws {
        let out = try ProcessRunner.run(["ip"] + args, timeout: 10, package: "iproute2")
        guard out.status == 0 else {
            throw MicroVMError(.backend, "'ip \(args.joined(separator: " "))' failed: \(out.stderrText.trimmed()); \(purpose) needs root (CAP_NET_ADMIN) and iproute2")
        }
    }

    /// "10.0.0.1/30" → "10.0.0.1"; a bare address is returned as it is.
    public static func address(_ cidr: String) -> String {
        cidr.split(separator: "/").first.map(String.init) ?? cidr
    }

    /// "10.0.0.1" → "10.0.0.1/30"; an address with a length is returned as it is.
    public static func withLength(_ address: String, _ length: Int = 30) -> String {
        address.contains("/") ? address : "\(address)/\(length)"
    }
}

/// A Linux tap device (`/dev/net/tun`, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR): frames carry a 12-byte
/// virtio-net header, so offloads pass through to the guest unchanged.
///
/// A tap that this object creates lives as long as its descriptor: closing it (or the process
/// dying) removes the interface, so a crashed VMM leaves nothing behind. `persistent` taps are for
/// a separate process (QEMU) that attaches by name; `remove()` deletes them.
///
/// ```swift
/// let tap = try TapDevice(name: nil)               // mvt<hash>, non-persistent
/// try tap.configure(hostAddress: "10.200.0.1/30")  // address + link up
/// // hand tap.fd to a virtio-net device
/// ```
public final class TapDevice: @unchecked Sendable {
    /// Size of `struct virtio_net_hdr_v1` (the header with num_buffers), which virtio 1.x uses.
    public static let vnetHeaderSize: Int32 = 12
    // _IOW('T', n, int) on x86-64.
    static let TUNSETIFF: UInt = 0x4004_54ca
    static let TUNSETPERSIST: UInt = 0x4004_54cb
    public static let TUNSETOFFLOAD: UInt = 0x4004_54d0
    static let TUNSETVNETHDRSZ: UInt = 0x4004_54d8
    static let IFF_TAP: Int16 = 0x0002, IFF_NO_PI: Int16 = 0x1000, IFF_VNET_HDR: Int16 = 0x4000
    /// TUNSETOFFLOAD bits.
    public static let offloadCsum: UInt32 = 0x01, offloadTSO4: UInt32 = 0x02, offloadTSO6: UInt32 = 0x04

    public let name: String
    /// The tap's descriptor (non-blocking); -1 once closed.
    public private(set) var fd: Int32
    public let persistent: Bool

    /// Creates (or, for an existing persistent tap, attaches to) `name`; nil picks `mvt<tag>`.
    public init(name: String?, tag: String = UUID().uuidString, persistent: Bool = false) throws {
        let wanted = name ?? "mvt" + HostLinks.interfaceTag(tag)
        guard !wanted.isEmpty, wanted.utf8.count <= 15, !wanted.contains("/"), !wanted.contains(" ") else {
            throw MicroVMError.invalidArgument("tap name '\(wanted)' is not a valid interface name: 1-15 characters, no '/' or spaces")
        }
        let fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC | O_NONBLOCK)
        guard fd >= 0 else {
            let why = String(cString: strerror(errno))
            throw MicroVMError(.unsupported, "cannot open /dev/net/tun: \(why); load the tun module (modprobe tun) and run as root")
        }
        var ifr = [UInt8](repeating: 0, count: 40)  // struct ifreq: name[16], then the flags
        ifr.replaceSubrange(0..<wanted.utf8.count, with: Array(wanted.utf8))
        withUnsafeBytes(of: (Self.IFF_TAP | Self.IFF_NO_PI | Self.IFF_VNET_HDR).littleEndian) { ifr.replaceSubrange(16..<18, with: $0) }
        var r = ifr.withUnsafeMutableBytes { ioctl(fd, Self.TUNSETIFF, $0.baseAddress!) }
        if r == 0 {
            var size = Self.vnetHeaderSize
            r = withUnsafeMutableBytes(of: &size) { ioctl(fd, Self.TUNSETVNETHDRSZ, $0.baseAddress!) }
        }
        if r == 0, persistent { r = ioctl(fd, Self.TUNSETPERSIST, CInt(1)) }
        guard r == 0 else {
            let e = errno
            Glibc.close(fd)
            let hint = e == EPERM ? "creating a tap needs root (CAP_NET_ADMIN)"
                : e == EBUSY ? "another process holds it; pick another name" : "check the name"
            throw MicroVMError(.backend, "cannot set up tap '\(wanted)': \(String(cString: strerror(e))); \(hint)")
        }
        self.fd = fd
        self.persistent = persistent
        self.name = String(decoding: ifr[0..<16].prefix { $0 != 0 }, as: UTF8.self)
    }

    deinit { close() }

    /// Gives the host end an address and brings the link up.
    public func configure(hostAddress: String) throws {
        try HostLinks.ip(["addr", "add", HostLinks.withLength(hostAddress), "dev", name], purpose: "a VM's tap link")
        try HostLinks.ip(["link", "set", name, "up"], purpose: "a VM's tap link")
    }

    /// Tells the kernel which offloads the guest accepts (TUN_F_* bits): frames towards the guest
    /// then keep partial checksums and large segments instead of being finished on the host.
    public func setOffloads(_ bits: UInt32) -> Bool {
        fd >= 0 && ioctl(fd, Self.TUNSETOFFLOAD, CInt(bitPattern: bits)) == 0
    }

    /// Closes the descriptor: a non-persistent tap disappears with it.
    public func close() {
        if fd >= 0 { _ = Glibc.close(fd); fd = -1 }
    }

    /// Closes and deletes a persistent tap (idempotent; a tap already gone is fine).
    public func remove() {
        close()
        if persistent { Self.delete(name) }
    }

    /// Deletes the interface `name` if it exists: a persistent tap this project made, whoever
    /// made it (a run that was killed leaves its tap behind).
    public static func delete(_ name: String) {
        guard FileManager.default.fileExists(atPath: "/sys/class/net/" + name) else { return }
        _ = try? ProcessRunner.run(["ip", "link", "delete", name], timeout: 10)
    }
}

/// A VM's link to the host: its tap and the addresses at either end, as `NetSpec` asked.
///
/// - `--net tap`: a new tap `mvt<hash>` on a free /30, the host at `.1`, the guest at `.2`.
/// - `--net tap=NAME` for a tap that does not exist yet: the same, under that name.
/// - `--net tap=NAME` for an existing tap: attached as it is (its address, bridge or routes are
///   the owner's); the guest gets an address only when the spec gives one.
public struct TapLink: Sendable {
    public let tap: TapDevice
    /// CIDR of the host end, when MicroVM configured it.
    public let hostAddress: String?
    /// CIDR of the guest's eth0, when it has one.
    public let guestAddress: String?

    /// The spec's network as this link resolved it: the tap's name and both ends' addresses.
    public var resolved: NetSpec { NetSpec(tap: tap.name, hostAddress: hostAddress, guestAddress: guestAddress) }

    /// The tap `open(spec, owner:persistent: true)` will use, and whether it will create (and so
    /// must later delete) it: known before it exists, so a record can name it first.
    public static func plannedTap(_ spec: NetSpec, owner: String) -> (name: String, creates: Bool) {
        let name = spec.tap ?? "mvt" + HostLinks.interfaceTag(owner)
        return (name, !FileManager.default.fileExists(atPath: "/sys/class/net/" + name))
    }

    public static func open(_ spec: NetSpec, owner: String, persistent: Bool = false) throws -> TapLink {
        let existed = spec.tap.map { FileManager.default.fileExists(atPath: "/sys/class/net/" + $0) } ?? false
        let tap = try TapDevice(name: spec.tap, tag: owner, persistent: persistent && !existed)
        do {
            var host = spec.hostAddress, guest = spec.guestAddress
            if !existed, host == nil || guest == nil {
                let free = try HostLinks.freeSubnet()
                host = host ?? free.host
                guest = guest ?? free.instance
            }
            if let host {
                try tap.configure(hostAddress: host)
            } else if existed {
                try HostLinks.ip(["link", "set", tap.name, "up"], purpose: "a VM's tap link")
            }
            return TapLink(tap: tap, hostAddress: host.map { HostLinks.withLength($0) }, guestAddress: guest.map { HostLinks.withLength($0) })
        } catch {
            tap.remove()
            throw error
        }
    }
}
