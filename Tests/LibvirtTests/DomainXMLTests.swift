import Foundation
import Testing
@testable import Libvirt
import MicroVMCore
import ConfigFile

/// The domain XML builder: escaping, slice mapping, and libvirt's own schema for every profile.
@Suite("domain XML")
struct DomainXMLTests {
    static func config(name: String = "mvm-x", cmdline: String = "console=ttyS0", slice: ResourceSlice? = nil,
                       accelerator: DomainConfig.Accelerator = .qemu, vcpus: Int = 1, memory: ByteCount = .mebibytes(128)) -> DomainConfig {
        DomainConfig(name: name, uuid: UUID(uuidString: "11111111-2222-3333-4444-555555555555")!, memory: memory, vcpus: vcpus,
                     accelerator: accelerator, kernel: "/img/vmlinuz", initrd: "/img/initrd.img", cmdline: cmdline,
                     disks: [.init(path: "/img/rootfs.ext4", readOnly: true, relabel: false), .init(path: "/data/d.img", readOnly: false, direct: true)],
                     taps: ["tap-mvm0"], consoleLog: "/run/x/console.log", enforcement: slice.map { Enforcement(slice: $0, mode: .hosted) })
    }

    static let validator: String? = ProcessRunner.which("virt-xml-validate")

    /// Runs libvirt's schema validator on a document; returns its complaint, nil when valid.
    static func schemaErrors(_ xml: String) throws -> String? {
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("mvm-dom-\(UUID().uuidString).xml").path
        try xml.write(toFile: file, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: file) }
        let out = try ProcessRunner.run(["virt-xml-validate", file, "domain"], timeout: 60, package: "libvirt-clients")
        return out.status == 0 ? nil : out.stdoutText + out.stderrText
    }

    @Test func escapesHostileNamesAndCommandLines() throws {
        let name = "evil'><on_crash>preserve<on_crash x='&\""
        let cmd = "console=ttyS0 x=\"]]><devices/>\" & y='<'"
        let xml = try DomainXML.document(for: Self.config(name: name, cmdline: cmd))
        #expect(!xml.contains("<on_crash>preserve"))
        #expect(xml.contains("<name>evil&apos;&gt;&lt;on_crash&gt;preserve&lt;on_crash x=&apos;&amp;&quot;</name>"))
        #expect(xml.contains("x=&quot;]]&gt;&lt;devices/&gt;&quot; &amp; y=&apos;&lt;&apos;"))
        #expect(xml.components(separatedBy: "<on_crash>").count == 2)
        if Self.validator != nil { #expect(try Self.schemaErrors(xml) == nil) }
    }

    @Test func escapedDocumentRoundTripsThroughLibvirt() throws {
        // The test driver parses the document as libvirt would and gives back the hostile name intact.
        let name = "a<b>&'\"c \(UUID().uuidString.prefix(4))"
        var tree = DomainXML.tree(for: Self.config(name: name))
        tree.attributes = [.init(name: "type", value: "test")]
        tree.children.removeAll { $0.name == "devices" }
        let conn = try LibvirtConnection.open("test:///default")
        let d = try conn.define(xml: tree.rendered())
        defer { try? d.undefine() }
        #expect(d.name == name)
        #expect(try d.xmlDescription().contains("console=ttyS0"))
    }

    @Test func rejectsWhatNoEscapingCanCarry() {
        #expect(throws: MicroVMError.self) { try DomainXML.document(for: Self.config(name: "a/b")) }
        #expect(throws: MicroVMError.self) { try DomainXML.document(for: Self.config(name: "")) }
        #expect(throws: MicroVMError.self) { try DomainXML.document(for: Self.config(name: "bell\u{07}")) }
        #expect(throws: MicroVMError.self) { try DomainXML.document(for: Self.config(cmdline: "a\nb")) }
        #expect(throws: MicroVMError.self) { try DomainXML.document(for: Self.config(cmdline: "nul\u{0}")) }
        #expect(throws: MicroVMError.self) { try DomainXML.document(for: Self.config(vcpus: 0)) }
    }

    @Test func fixedShapeOfAGuest() throws {
        let xml = try DomainXML.document(for: Self.config())
        #expect(xml.contains("<domain type='qemu'>"))
        #expect(xml.contains("<memory unit='KiB'>131072</memory>"))
        #expect(xml.contains("<on_poweroff>destroy</on_poweroff>"))
        #expect(xml.contains("<on_reboot>destroy</on_reboot>"))
        #expect(xml.contains("<on_crash>destroy</on_crash>"))
        #expect(xml.contains("<kernel>/img/vmlinuz</kernel>"))
        #expect(xml.contains("<target dev='vda' bus='virtio'/>"))
        #expect(xml.contains("<target dev='vdb' bus='virtio'/>"))
        #expect(xml.contains("<readonly/>"))
        #expect(xml.contains("<seclabel model='dac' relabel='no'/>"))
        #expect(xml.contains("cache='none' io='native'"))
        #expect(xml.contains("<serial type='file'>"))
        #expect(xml.contains("<target dev='tap-mvm0' managed='no'/>"))
        #expect(!xml.contains("<vsock"), "no CID, no vsock device")
        var withVsock = Self.config()
        withVsock.vsockCID = 42
        let vsockXML = try DomainXML.document(for: withVsock)
        #expect(vsockXML.contains("<vsock model='virtio'>") && vsockXML.contains("<cid auto='no' address='42'/>"))
        #expect(!xml.contains("<cpu"), "TCG must not ask for the host CPU")
        #expect(!xml.contains("<cputune"), "no slice, no tuning")
        let kvm = try DomainXML.document(for: Self.config(accelerator: .kvm))
        #expect(kvm.contains("<domain type='kvm'>"))
        #expect(kvm.contains("<cpu mode='host-model'/>"))
    }

    @Test func sliceBecomesCputuneAndMemtune() throws {
        let dedicated = ResourceSlice(cpus: 2, placement: .dedicated, cpuSet: [3, 1], cpuWeight: 200, cpuQuota: 1.5, memory: .mebibytes(512))
        let xml = try DomainXML.document(for: Self.config(slice: dedicated, vcpus: 2, memory: .mebibytes(512)))
        #expect(xml.contains("<shares>2048</shares>"))
        #expect(xml.contains("<global_period>100000</global_period>"))
        #expect(xml.contains("<global_quota>150000</global_quota>"))
        #expect(xml.contains("<vcpupin vcpu='0' cpuset='1'/>"))
        #expect(xml.contains("<vcpupin vcpu='1' cpuset='3'/>"))
        #expect(xml.contains("<emulatorpin cpuset='1,3'/>"))
        // Guest RAM plus QEMU's allowance: 512 + 256 MiB.
        #expect(xml.contains("<hard_limit unit='KiB'>786432</hard_limit>"))

        // Shared placement adds a weight; it does not lift the cap of 2 CPUs of work.
        let shared = ResourceSlice(cpus: 2, placement: .shared, cpuSet: [0, 1, 2], memory: .mebibytes(256))
        let xml2 = try DomainXML.document(for: Self.config(slice: shared, vcpus: 2))
        #expect(xml2.contains("<vcpupin vcpu='0' cpuset='0-2'/>"))
        #expect(xml2.contains("<vcpupin vcpu='1' cpuset='0-2'/>"))
        #expect(xml2.contains("<shares>1024</shares>"))
        #expect(xml2.contains("<global_quota>200000</global_quota>"))

        var noLimit = Self.config(slice: shared)
        noLimit.memoryHardLimit = false
        #expect(!(try DomainXML.document(for: noLimit)).contains("memtune"))
        #expect(Enforcement.shares(weight: 1) == 10)
        #expect(Enforcement.shares(weight: 10000) == 102_400)
        let huge = ResourceSlice(cpus: 1, memory: .mebibytes(256), hugePages: true, numaNode: 1)
        let xml3 = try DomainXML.document(for: Self.config(slice: huge))
        #expect(xml3.contains("<hugepages/>"))
        #expect(xml3.contains("<memory mode='strict' nodeset='1'/>"))
    }

    @Test func diskNamesFollowLinux() {
        #expect(DomainXML.diskName(0) == "vda")
        #expect(DomainXML.diskName(25) == "vdz")
        #expect(DomainXML.diskName(26) == "vdaa")
        #expect(DomainXML.diskName(27) == "vdab")
    }

    @Test func memlockCapabilityIsReadFromProcStatus() {
        #expect(HostedBackend.canRaiseMemlockLimit(status: "Name:\tx\nCapEff:\t000001ffffffffff\n"))
        #expect(!HostedBackend.canRaiseMemlockLimit(status: "CapEff:\t000001fffeffffff\n"))
        #expect(!HostedBackend.canRaiseMemlockLimit(status: "garbage"))
    }

    @Test(.enabled(if: validator != nil, "virt-xml-validate is not installed (apt-get install libvirt-clients)"))
    func everyConfigProfileValidatesAgainstLibvirtsSchema() throws {
        let config = try MicroVMConfig.load()
        #expect(!config.profiles.isEmpty)
        for (name, profile) in config.profiles.sorted(by: { $0.key < $1.key }) {
            var slice = profile.slice()
            slice.cpuSet = Array(0..<max(1, profile.cpus))
            for accel in [DomainConfig.Accelerator.qemu, .kvm] {
                for machine in ["pc", "microvm"] {
                    var c = Self.config(name: "mvm-\(name)", slice: slice, accelerator: accel, vcpus: profile.cpus, memory: profile.memory)
                    c.machine = machine
                    c.vsockCID = 3
                    let xml = try DomainXML.document(for: c)
                    #expect(try Self.schemaErrors(xml) == nil, "profile \(name), \(accel), \(machine)")
                    c.balloon = BalloonSpec(amount: .mebibytes(16))
                    #expect(try Self.schemaErrors(try DomainXML.document(for: c)) == nil, "profile \(name), \(accel), \(machine), with a balloon")
                }
            }
        }
    }

    /// `--balloon`: a virtio memballoon with free page reporting, statistics and deflate on OOM,
    /// the guest started with what the balloon leaves it; without one, none at all.
    @Test func aBalloonIsVirtioWithReportingAndStatistics() throws {
        var c = Self.config(memory: .mebibytes(512))
        #expect(try DomainXML.document(for: c).contains("<memballoon model='none'/>"))
        c.balloon = BalloonSpec(amount: .mebibytes(128), deflateOnOOM: true, statsInterval: 2, freePageReporting: true)
        let xml = try DomainXML.document(for: c)
        #expect(xml.contains("<memballoon model='virtio' autodeflate='on' freePageReporting='on'>"), "\(xml)")
        #expect(xml.contains("<stats period='2'/>"))
        #expect(xml.contains("<memory unit='KiB'>524288</memory>") && xml.contains("<currentMemory unit='KiB'>393216</currentMemory>"))
    }

    /// `--max-cpus`: slots for vCPUs plugged in while the guest runs, each pinned as the grant
    /// says, on a machine with CPU hotplug; microvm has none and is refused.
    @Test func roomForMoreVCPUsIsEmptySlotsPinnedAhead() throws {
        var c = Self.config(slice: ResourceSlice(cpus: 1, placement: .dedicated, cpuSet: [3], memory: .mebibytes(128)), vcpus: 1)
        c.machine = "pc"
        c.maxVCPUs = 3
        let xml = try DomainXML.document(for: c)
        #expect(xml.contains("<vcpu placement='static' current='1'>3</vcpu>"), "\(xml)")
        for v in 0..<3 { #expect(xml.contains("<vcpupin vcpu='\(v)' cpuset='3'/>"), "\(xml)") }
        if Self.validator != nil { #expect(try Self.schemaErrors(xml) == nil) }
        c.maxVCPUs = 1
        #expect(try DomainXML.document(for: c).contains("<vcpu placement='static'>1</vcpu>"))
        c.machine = "microvm"
        c.maxVCPUs = 2
        #expect(throws: MicroVMError.self) { try DomainXML.document(for: c) }
        c.machine = "pc"
        c.vcpus = 3
        #expect(throws: MicroVMError.self) { try DomainXML.document(for: c) }
    }
}
