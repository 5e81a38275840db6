import Foundation
import MicroVMCore

/// A small XML element tree that escapes every attribute value and text node when rendered,
/// so user input (names, command lines, paths) can never change the document's structure.
public struct XMLTree: Sendable, Equatable {
    public var name: String
    public var attributes: [Attribute]
    public var children: [XMLTree]
    public var text: String?

    public struct Attribute: Sendable, Equatable {
        public var name: String
        public var value: String
    }

    public init(_ name: String, _ attributes: KeyValuePairs<String, String> = [:], text: String? = nil, children: [XMLTree] = []) {
        self.name = name
        self.attributes = attributes.map { Attribute(name: $0.key, value: $0.value) }
        self.text = text
        self.children = children
    }

    public init(_ name: String, _ attributes: KeyValuePairs<String, String> = [:], @XMLChildren _ build: () -> [XMLTree]) {
        self.init(name, attributes, children: build())
    }

    public func rendered(indent: Int = 0) -> String {
        let pad = String(repeating: "  ", count: indent)
        var s = pad + "<" + name
        for a in attributes { s += " \(a.name)='\(Self.escape(a.value))'" }
        if children.isEmpty && text == nil { return s + "/>\n" }
        s += ">"
        if let text { s += Self.escape(text) }
        if !children.isEmpty {
            s += "\n" + children.map { $0.rendered(indent: indent + 1) }.joined() + pad
        }
        return s + "</\(name)>\n"
    }

    /// Escapes the five XML specials; quotes too, so the result is safe in either attribute quoting.
    public static func escape(_ s: String) -> String {
        var out = ""
        out.reserveCapacity(s.utf8.count)
        for c in s.unicodeScalars {
            switch c {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "'": out += "&apos;"
            case "\"": out += "&quot;"
            default: out.unicodeScalars.append(c)
            }
        }
        return out
    }

    /// Characters XML 1.0 cannot carry at all, escaped or not (C0 controls other than tab, LF, CR).
    static func hasForbiddenCharacters(_ s: String) -> Bool {
        s.unicodeScalars.contains { $0.value < 0x20 && $0 != "\t" && $0 != "\n" && $0 != "\r" || $0.value == 0xFFFE || $0.value == 0xFFFF }
    }
}

@resultBuilder
public enum XMLChildren {
    public static func buildExpression(_ e: XMLTree) -> [XMLTree] { [e] }
    public static func buildExpression(_ e: [XMLTree]) -> [XMLTree] { e }
    public static func buildBlock(_ parts: [XMLTree]...) -> [XMLTree] { parts.flatMap { $0 } }
    public static func buildOptional(_ e: [XMLTree]?) -> [XMLTree] { e ?? [] }
    public static func buildEither(first e: [XMLTree]) -> [XMLTree] { e }
    public static func buildEither(second e: [XMLTree]) -> [XMLTree] { e }
    public static func buildArray(_ e: [[XMLTree]]) -> [XMLTree] { e.flatMap { $0 } }
}

/// Everything a hosted guest's domain XML says, already resolved (image paths, machine type,
/// accelerator). `DomainXML.document(for:)` turns it into libvirt's XML.
public struct DomainConfig: Sendable, Equatable {
    /// `kvm` only on hardware virtualization; `qemu` is TCG emulation.
    public enum Accelerator: String, Sendable { case kvm, qemu }

    public struct Disk: Sendable, Equatable {
        public var path: String
        public var readOnly: Bool
        /// O_DIRECT on the host file (cache='none' io='native').
        public var direct: Bool
        /// false: libvirt must not chown the file (a shared, world-readable image).
        public var relabel: Bool
        public init(path: String, readOnly: Bool, direct: Bool = false, relabel: Bool = true) {
            self.path = path; self.readOnly = readOnly; self.direct = direct; self.relabel = relabel
        }
    }

    public var name: String
    public var uuid: UUID
    public var memory: ByteCount
    public var vcpus: Int
    /// Room for vCPUs added while it runs (libvirt's live `setVcpus`): the machine has this many
    /// slots and `vcpus` of them filled. nil: exactly `vcpus`. A machine with CPU hotplug (`pc`)
    /// is needed: microvm has none.
    public var maxVCPUs: Int?
    public var accelerator: Accelerator
    public var machine: String
    public var kernel: String
    public var initrd: String?
    public var cmdline: String
    /// In order: the first becomes /dev/vda.
    public var disks: [Disk]
    /// Host tap devices (existing, unmanaged) for virtio-net interfaces.
    public var taps: [String]
    /// The guest's vsock CID (a vhost-vsock device), if it has one.
    public var vsockCID: UInt32?
    /// The file that receives the serial console.
    public var consoleLog: String
    /// The granted slice as libvirt enforces it (cputune, memtune, numatune, memoryBacking).
    public var enforcement: Enforcement?
    /// A virtio memory balloon (free page reporting, statistics, deflate on OOM), its initial
    /// size taken from `memory`; nil: no balloon (`<memballoon model='none'>`).
    public var balloon: BalloonSpec?
    /// Whether `<memtune><hard_limit>` is emitted: libvirt then raises RLIMIT_MEMLOCK, which needs
    /// CAP_SYS_RESOURCE (containers often lack it).
    public var memoryHardLimit: Bool

    public init(name: String, uuid: UUID = UUID(), memory: ByteCount, vcpus: Int, accelerator: Accelerator, machine: String = "pc",
                kernel: String, initrd: String? = nil, cmdline: String, disks: [Disk] = [], taps: [String] = [],
                consoleLog: String, enforcement: Enforcement? = nil, memoryHardLimit: Bool = true) {
        self.name = name; self.uuid = uuid; self.memory = memory; self.vcpus = vcpus; self.accelerator = accelerator
        self.machine = machine; self.kernel = kernel; self.initrd = initrd; self.cmdline = cmdline; self.disks = disks
        self.taps = taps; self.consoleLog = consoleLog; self.enforcement = enforcement; self.memoryHardLimit = memoryHardLimit
    }
}

/// Builds libvirt domain XML for hosted guests: direct kernel boot, virtio disks and network,
/// the serial console into a file, every end of life mapped to destroy, and the resource slice
/// as `<cputune>`/`<memtune>`.
public enum DomainXML {

    public static func document(for c: DomainConfig) throws -> String {
        try validate(c)
        return "<!-- generated by MicroVM -->\n" + tree(for: c).rendered()
    }

    public static func tree(for c: DomainConfig) -> XMLTree {
        XMLTree("domain", ["type": c.accelerator.rawValue]) {
            XMLTree("name", text: c.name)
            XMLTree("uuid", text: c.uuid.uuidString.lowercased())
            XMLTree("memory", ["unit": "KiB"], text: "\(c.memory.kibibytes)")
            if let b = c.balloon, b.amount.bytes > 0 { XMLTree("currentMemory", ["unit": "KiB"], text: "\((c.memory - b.amount).kibibytes)") }
            if let max = c.maxVCPUs, max > c.vcpus {
                XMLTree("vcpu", ["placement": "static", "current": "\(c.vcpus)"], text: "\(max)")
            } else {
                XMLTree("vcpu", ["placement": "static"], text: "\(c.vcpus)")
            }
            cputune(c)
            memtune(c)
            numatune(c)
            memoryBacking(c)
            XMLTree("os") {
                XMLTree("type", ["arch": "x86_64", "machine": c.machine], text: "hvm")
                XMLTree("kernel", text: c.kernel)
                if let initrd = c.initrd { XMLTree("initrd", text: initrd) }
                XMLTree("cmdline", text: c.cmdline)
            }
            if c.machine != "microvm" { XMLTree("features") { XMLTree("acpi") } }
            // TCG gets QEMU's default model: `host-*` would ask the emulator to copy a CPU it is not running on.
            if c.accelerator == .kvm { XMLTree("cpu", ["mode": "host-model"]) }
            XMLTree("clock", ["offset": "utc"])
            XMLTree("on_poweroff", text: "destroy")
            XMLTree("on_reboot", text: "destroy")
            XMLTree("on_crash", text: "destroy")
            XMLTree("devices") {
                for (i, d) in c.disks.enumerated() { disk(d, index: i, machine: c.machine) }
                for tap in c.taps {
                    XMLTree("interface", ["type": "ethernet"]) {
                        XMLTree("target", ["dev": tap, "managed": "no"])
                        XMLTree("model", ["type": "virtio"])
                        if c.machine == "microvm" { XMLTree("address", ["type": "virtio-mmio"]) }
                    }
                }
                if let cid = c.vsockCID {
                    XMLTree("vsock", ["model": "virtio"]) {
                        XMLTree("cid", ["auto": "no", "address": "\(cid)"])
                        if c.machine == "microvm" { XMLTree("address", ["type": "virtio-mmio"]) }
                    }
                }
                XMLTree("serial", ["type": "file"]) {
                    XMLTree("source", ["path": c.consoleLog, "append": "on"])
                    XMLTree("target", ["port": "0"])
                }
                XMLTree("console", ["type": "file"]) {
                    XMLTree("source", ["path": c.consoleLog, "append": "on"])
                    XMLTree("target", ["type": "serial", "port": "0"])
                }
                if c.machine != "microvm" { XMLTree("controller", ["type": "usb", "model": "none"]) }
                if let b = c.balloon {
                    XMLTree("memballoon", ["model": "virtio", "autodeflate": b.deflateOnOOM ? "on" : "off",
                                           "freePageReporting": b.freePageReporting ? "on" : "off"]) {
                        if b.statsInterval > 0 { XMLTree("stats", ["period": "\(b.statsInterval)"]) }
                        if c.machine == "microvm" { XMLTree("address", ["type": "virtio-mmio"]) }
                    }
                } else {
                    XMLTree("memballoon", ["model": "none"])
                }
            }
        }
    }

    static func disk(_ d: DomainConfig.Disk, index: Int, machine: String) -> XMLTree {
        XMLTree("disk", ["type": "file", "device": "disk"]) {
            if d.direct { XMLTree("driver", ["name": "qemu", "type": "raw", "cache": "none", "io": "native"]) }
            else { XMLTree("driver", ["name": "qemu", "type": "raw"]) }
            XMLTree("source", ["file": d.path]) {
                if !d.relabel { XMLTree("seclabel", ["model": "dac", "relabel": "no"]) }
            }
            XMLTree("target", ["dev": diskName(index), "bus": "virtio"])
            if d.readOnly { XMLTree("readonly") }
            if machine == "microvm" { XMLTree("address", ["type": "virtio-mmio"]) }
        }
    }

    /// vda, vdb, … vdz, vdaa, …: the names Linux gives virtio disks in probe order.
    public static func diskName(_ index: Int) -> String {
        var n = index, suffix = ""
        repeat {
            suffix = String(UnicodeScalar(UInt8(97 + n % 26))) + suffix
            n = n / 26 - 1
        } while n >= 0
        return "vd" + suffix
    }


    /// The whole domain (vCPUs, emulator and I/O threads) gets at most the enforcement's CPUs of
    /// work (`global_*`; plain period/quota would apply per vCPU thread); each vCPU is pinned as
    /// the enforcement says, QEMU's own threads to the whole set.
    static func cputune(_ c: DomainConfig) -> [XMLTree] {
        guard let e = c.enforcement else { return [] }
        var kids: [XMLTree] = []
        kids.append(XMLTree("shares", text: "\(Enforcement.shares(weight: e.cpuWeight))"))
        kids.append(XMLTree("global_period", text: "\(Enforcement.period)"))
        kids.append(XMLTree("global_quota", text: "\(e.quotaMicros)"))
        if !e.vcpuPins.isEmpty {
            for v in 0..<max(c.vcpus, c.maxVCPUs ?? 0) {
                kids.append(XMLTree("vcpupin", ["vcpu": "\(v)", "cpuset": CPUList.format(e.vcpuPins[v % e.vcpuPins.count])]))
            }
        }
        if !e.cpuSet.isEmpty { kids.append(XMLTree("emulatorpin", ["cpuset": CPUList.format(e.cpuSet)])) }
        return [XMLTree("cputune", children: kids)]
    }

    /// Guest RAM plus QEMU's own allowance (`Enforcement.overhead(for: .hosted)`).
    static func memtune(_ c: DomainConfig) -> [XMLTree] {
        guard let e = c.enforcement, c.memoryHardLimit else { return [] }
        return [XMLTree("memtune") {
            XMLTree("hard_limit", ["unit": "KiB"], text: "\(e.memoryLimit.kibibytes)")
            XMLTree("swap_hard_limit", ["unit": "KiB"], text: "\(e.memoryLimit.kibibytes)")
        }]
    }

    static func numatune(_ c: DomainConfig) -> [XMLTree] {
        guard let node = c.enforcement?.numaNode else { return [] }
        return [XMLTree("numatune") { XMLTree("memory", ["mode": "strict", "nodeset": "\(node)"]) }]
    }

    static func memoryBacking(_ c: DomainConfig) -> [XMLTree] {
        guard c.enforcement?.hugePages == true else { return [] }
        return [XMLTree("memoryBacking") { XMLTree("hugepages") }]
    }

    /// Rejects what no escaping can make valid: libvirt forbids '/' in names, and XML 1.0 cannot
    /// carry control characters.
    public static func checkName(_ name: String) throws {
        if name.isEmpty || name.contains("/") || name.utf8.count > 200 || name == "." || name == ".." {
            throw MicroVMError.invalidArgument("'\(name)' cannot be a libvirt domain name: use 1–200 characters without '/'")
        }
        if XMLTree.hasForbiddenCharacters(name) || name.contains(where: \.isNewline) {
            throw MicroVMError.invalidArgument("the instance name contains control characters: remove them")
        }
    }

    static func validate(_ c: DomainConfig) throws {
        try checkName(c.name)
        for (what, value) in [("name", c.name), ("kernel command line", c.cmdline), ("kernel path", c.kernel), ("console path", c.consoleLog)]
            + c.disks.map({ ("disk path", $0.path) }) + c.taps.map({ ("tap name", $0) }) + [("initrd path", c.initrd ?? "")] {
            if XMLTree.hasForbiddenCharacters(value) || (what == "name" || what == "kernel command line") && value.contains(where: \.isNewline) {
                throw MicroVMError.invalidArgument("the \(what) contains control characters, which a domain definition cannot carry: remove them")
            }
        }
        guard c.vcpus >= 1 else { throw MicroVMError.invalidArgument("a domain needs at least one vCPU (got \(c.vcpus))") }
        if let max = c.maxVCPUs, max < c.vcpus || (max > c.vcpus && c.machine == "microvm") {
            throw MicroVMError.invalidArgument(max < c.vcpus ? "room for \(max) vCPUs cannot hold the \(c.vcpus) the domain boots with"
                : "the microvm machine has no CPU hotplug: a domain with room for more vCPUs than it boots with needs pc")
        }
        if let e = c.enforcement, (e.cpuSet + e.vcpuPins.flatMap { $0 }).contains(where: { $0 < 0 }) {
            throw MicroVMError.invalidArgument("CPU set \(e.cpuSet) names a negative CPU")
        }
    }
}
