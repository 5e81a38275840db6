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
        let tag = HostLinks.interfaceTag(id)
        return (id, "mvh" + tag, "mvc" + tag)
    }

    /// Creates the namespace and link. Anything made before a failure is removed again.
    static func setUp(id: String, spec: NetSpec) throws -> ContainerNetwork {
        let n = names(id: id)
        var host = spec.hostAddress.map(HostLinks.address), guest = spec.guestAddress.map(HostLinks.address)
        if host == nil || guest == nil {
            let free = try HostLinks.freeSubnet()
            host = free.host; guest = free.instance
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
        try HostLinks.ip(args, purpose: "container networking")
    }
}
