import Foundation
import MicroVMCore

/// A container's link to the host: a named network namespace and a veth pair on a private /30,
/// host side `10.200.X.Y+1`, container side `eth0` at `+2`. Nothing routes beyond the host.
public struct ContainerNetwork: Sendable, Equatable {
    public var netns: String
    public var hostVeth: String
    public var hostAddress: String
    public var containerAddress: String
    public var netnsPath: String { "/var/run/netns/" + netns }

    /// Interface names are limited to 15 bytes, so they carry a hash of the container id.
    static func names(id: String) -> (netns: String, host: String, peer: String) {
        var h: UInt32 = 2_166_136_261
        for b in id.utf8 { h = (h ^ UInt32(b)) &* 16_777_619 }
        let tag = String(format: "%08x", h)
        return (id, "mvh" + tag, "mvc" + tag)
    }

    /// The n-th /30 of 10.200.0.0/16: (host, container) addresses.
    static func subnet(_ n: Int) -> (String, String) {
        let base = n * 4
        return ("10.200.\(base / 256).\(base % 256 + 1)", "10.200.\(base / 256).\(base % 256 + 2)")
    }

    /// Creates the namespace and link. Anything made before a failure is removed again.
    static func setUp(id: String, spec: NetSpec) throws -> ContainerNetwork {
        let n = names(id: id)
        let used = (try? ProcessRunner.run(["ip", "-o", "-4", "addr", "show"], timeout: 10).stdoutText) ?? ""
        var host = spec.hostAddress, guest = spec.guestAddress
        if host == nil || guest == nil {
            guard let free = (0..<16_384).first(where: { !used.contains(" \(subnet($0).0)/") }) else {
                throw MicroVMError(.insufficientResources, "no free /30 left in 10.200.0.0/16 for container links: remove stale mvh* interfaces")
            }
            (host, guest) = subnet(free)
        }
        let net = ContainerNetwork(netns: n.netns, hostVeth: n.host, hostAddress: host ?? "", containerAddress: guest ?? "")
        do {
            try ip(["netns", "add", n.netns])
            try ip(["link", "add", n.host, "type", "veth", "peer", "name", n.peer])
            try ip(["link", "set", n.peer, "netns", n.netns])
            try ip(["addr", "add", net.hostAddress + "/30", "dev", n.host])
            try ip(["link", "set", n.host, "up"])
            try ip(["-n", n.netns, "link", "set", n.peer, "name", "eth0"])
            try ip(["-n", n.netns, "addr", "add", net.containerAddress + "/30", "dev", "eth0"])
            try ip(["-n", n.netns, "link", "set", "eth0", "up"])
            try ip(["-n", n.netns, "link", "set", "lo", "up"])
        } catch {
            tearDown(id: id)
            throw error
        }
        return net
    }

    /// Removes the namespace (which takes the container end of the pair with it) and the host end.
    static func tearDown(id: String) {
        let n = names(id: id)
        _ = try? ProcessRunner.run(["ip", "link", "delete", n.host], timeout: 10)
        if FileManager.default.fileExists(atPath: "/var/run/netns/" + n.netns) {
            _ = try? ProcessRunner.run(["ip", "netns", "delete", n.netns], timeout: 10)
        }
    }

    private static func ip(_ args: [String]) throws {
        let out = try ProcessRunner.run(["ip"] + args, timeout: 10, package: "iproute2")
        guard out.status == 0 else {
            throw MicroVMError(.backend, "'ip \(args.joined(separator: " "))' failed: \(out.stderrText.trimmingCharacters(in: .whitespacesAndNewlines)); container networking needs root and iproute2")
        }
    }
}
