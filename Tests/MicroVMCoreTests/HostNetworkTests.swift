import Foundation
import MicroVMCore
import Testing

@Suite struct NetSpecParsingTests {
    @Test func tapForms() throws {
        #expect(try NetSpec(parsing: "tap") == NetSpec())
        #expect(try NetSpec(parsing: "tap=mytap0") == NetSpec(tap: "mytap0"))
        #expect(try NetSpec(parsing: "tap,host=10.9.0.1/30,guest=10.9.0.2/30")
                == NetSpec(hostAddress: "10.9.0.1/30", guestAddress: "10.9.0.2/30"))
        #expect(try NetSpec(parsing: "tap=t1,guest=192.168.7.2") == NetSpec(tap: "t1", guestAddress: "192.168.7.2"))
    }

    @Test(arguments: ["bridge", "tap=", "tap,host=", "tap,host=10.0.0.256", "tap,host=10.0.0.1/33", "tap,gateway=10.0.0.1", "tap,host=1.2.3"])
    func badFormsNameTheProblem(_ text: String) {
        #expect {
            _ = try NetSpec(parsing: text)
        } throws: { error in
            "\(error)".contains("--net")
        }
    }

    @Test func linkAddressesAndTags() {
        #expect(HostLinks.subnet(1, prefix: "10.201") == ("10.201.0.5", "10.201.0.6"))
        #expect(HostLinks.address("10.0.0.1/30") == "10.0.0.1")
        #expect(HostLinks.withLength("10.0.0.1") == "10.0.0.1/30")
        #expect(HostLinks.withLength("10.0.0.1/24") == "10.0.0.1/24")
        #expect(HostLinks.interfaceTag("a") != HostLinks.interfaceTag("b"))
        #expect(HostLinks.interfaceTag("a").count == 8)
    }
}

/// The real thing: a tap made through /dev/net/tun, addressed with iproute2, gone when closed.
@Suite(.enabled(if: getuid() == 0 && FileManager.default.fileExists(atPath: "/dev/net/tun"), "needs root and /dev/net/tun to create tap devices"))
struct TapDeviceTests {
    @Test func linkLivesAsLongAsItsDescriptor() throws {
        let link = try TapLink.open(NetSpec(), owner: "mvm-test-\(getpid())-\(UUID().uuidString)")
        let name = link.tap.name
        #expect(name.hasPrefix("mvt"))
        #expect(FileManager.default.fileExists(atPath: "/sys/class/net/" + name))
        let host = try #require(link.hostAddress), guest = try #require(link.guestAddress)
        var spec = VMSpec(name: "t")
        spec.net = link.resolved
        #expect(spec.initParameters == ["mvm.ip=\(guest)", "mvm.gw=\(HostLinks.address(host))"])
        let shown = try ProcessRunner.run(["ip", "-o", "-4", "addr", "show", "dev", name], timeout: 10).stdoutText
        #expect(shown.contains(" \(host) "), "\(shown)")
        #expect(link.tap.setOffloads(TapDevice.offloadCsum | TapDevice.offloadTSO4))
        link.tap.close()
        #expect(!FileManager.default.fileExists(atPath: "/sys/class/net/" + name), "closing the descriptor removes the tap")
    }

    @Test func existingTapIsAttachedAsItIs() throws {
        let name = "mvtx\(getpid() % 100_000)"
        let owner = try TapDevice(name: name, persistent: true)
        owner.close()  // persistent: it stays
        defer { owner.remove() }
        #expect(FileManager.default.fileExists(atPath: "/sys/class/net/" + name))
        let link = try TapLink.open(NetSpec(tap: name), owner: "x")
        #expect(link.hostAddress == nil && link.guestAddress == nil)
        var spec = VMSpec(name: "t")
        spec.net = link.resolved
        #expect(spec.initParameters.isEmpty, "an attached tap's guest configures nothing unless asked")
        link.tap.close()
        #expect(FileManager.default.fileExists(atPath: "/sys/class/net/" + name), "a tap that existed before stays")
    }

    @Test func badNameIsRefusedClearly() {
        #expect(throws: MicroVMError.self) { _ = try TapDevice(name: "a-name-longer-than-15") }
    }
}

@Suite struct VsockSpecTests {
    @Test func shellNeedsACID() throws {
        var spec = VMSpec(name: "v")
        spec.vsockShell = true
        #expect { try spec.validateSizes() } throws: { "\($0)".contains("--vsock-shell needs --vsock") }
        spec.vsockCID = 42
        try spec.validateSizes()
        #expect(spec.initParameters == ["mvm.vsock=1024"])
        spec.vsockShell = false
        #expect(spec.initParameters.isEmpty, "no shell unless asked for")
    }

    @Test func initParametersCarryTheLink() {
        var spec = VMSpec(name: "n", net: NetSpec(hostAddress: "10.9.0.1/30", guestAddress: "10.9.0.2"))
        #expect(spec.initParameters == ["mvm.ip=10.9.0.2/30", "mvm.gw=10.9.0.1"])
        spec.net = NetSpec(hostAddress: "10.9.0.1")
        #expect(spec.initParameters.isEmpty, "a gateway without an address configures nothing")
    }
}
