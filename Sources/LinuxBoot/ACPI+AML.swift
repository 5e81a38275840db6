import MicroVMCore

/// The few AML encodings the DSDT needs (ACPI 6.x §20.2 and the resource descriptors of §6.4),
/// bit-exact with what `iasl` emits for the same ASL.
enum AML {
    static let zeroOp: UInt8 = 0x00, oneOp: UInt8 = 0x01
    static let nameOp: UInt8 = 0x08, scopeOp: UInt8 = 0x10, bufferOp: UInt8 = 0x11
    static let bytePrefix: UInt8 = 0x0a, wordPrefix: UInt8 = 0x0b, dwordPrefix: UInt8 = 0x0c
    static let stringPrefix: UInt8 = 0x0d, qwordPrefix: UInt8 = 0x0e
    static let extOpPrefix: UInt8 = 0x5b, deviceOp: UInt8 = 0x82
    static let rootChar: UInt8 = 0x5c

    /// PkgLength: the length of what follows the opcode, itself included, in 1 to 4 bytes.
    static func pkgLength(contentLength n: Int) throws -> [UInt8] {
        if n + 1 <= 0x3f { return [UInt8(n + 1)] }
        for extra in 1...3 {
            let total = n + 1 + extra
            if total < 1 << (4 + 8 * extra) {
                var out = [UInt8(extra << 6) | UInt8(total & 0xf)]
                for i in 0..<extra { out.append(UInt8(truncatingIfNeeded: total >> (4 + 8 * i))) }
                return out
            }
        }
        throw MicroVMError(.internalError, "AML package of \(n) bytes exceeds the 256 MiB PkgLength limit")
    }

    /// A NameString: an optional root prefix and one 4-character NameSeg.
    static func nameString(_ name: String) throws -> [UInt8] {
        var bytes = Array(name.utf8)
        var prefix: [UInt8] = []
        if bytes.first == rootChar { prefix = [rootChar]; bytes.removeFirst() }
        guard bytes.count == 4, bytes.allSatisfy({ ($0 >= 0x41 && $0 <= 0x5a) || $0 == 0x5f || ($0 >= 0x30 && $0 <= 0x39) }),
              bytes[0] < 0x30 || bytes[0] > 0x39 else {
            throw MicroVMError(.internalError, "\(name) is not an AML NameSeg (4 of A-Z, 0-9, _; no leading digit)")
        }
        return prefix + bytes
    }

    /// The shortest integer encoding, as iasl chooses.
    static func integer(_ v: UInt64) -> [UInt8] {
        switch v {
        case 0: return [zeroOp]
        case 1: return [oneOp]
        case ...0xff: return [bytePrefix, UInt8(v)]
        case ...0xffff: return [wordPrefix] + le(v, 2)
        case ...0xffff_ffff: return [dwordPrefix] + le(v, 4)
        default: return [qwordPrefix] + le(v, 8)
        }
    }

    static func string(_ s: String) -> [UInt8] { [stringPrefix] + Array(s.utf8) + [0] }

    static func name(_ n: String, _ value: [UInt8]) throws -> [UInt8] { [nameOp] + (try nameString(n)) + value }

    static func scope(_ n: String, _ body: [UInt8]) throws -> [UInt8] {
        let content = try nameString(n) + body
        return [scopeOp] + (try pkgLength(contentLength: content.count)) + content
    }

    static func device(_ n: String, _ body: [UInt8]) throws -> [UInt8] {
        let content = try nameString(n) + body
        return [extOpPrefix, deviceOp] + (try pkgLength(contentLength: content.count)) + content
    }

    static func buffer(_ bytes: [UInt8]) throws -> [UInt8] {
        let content = integer(UInt64(bytes.count)) + bytes
        return [bufferOp] + (try pkgLength(contentLength: content.count)) + content
    }

    /// `Memory32Fixed (ReadWrite, base, length)`.
    static func memory32Fixed(base: UInt32, length: UInt32, writable: Bool = true) -> [UInt8] {
        [0x86, 9, 0, writable ? 1 : 0] + le(UInt64(base), 4) + le(UInt64(length), 4)
    }

    /// `Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }`: the transports
    /// pulse their line (KVM_IRQ_LINE high then low), so the guest must latch edges.
    static func extendedInterrupt(gsi: UInt32) -> [UInt8] {
        let flags: UInt8 = 0b0000_0011 // consumer, edge; active high, exclusive, not wake capable
        return [0x89, 6, 0, flags, 1] + le(UInt64(gsi), 4)
    }

    /// The end tag with a zero checksum, which the spec defines as "treat as valid" and which
    /// iasl and QEMU emit.
    static let endTag: [UInt8] = [0x79, 0]

    /// `ResourceTemplate () { … }` around `descriptors`.
    static func resourceTemplate(_ descriptors: [UInt8]) throws -> [UInt8] {
        try buffer(descriptors + endTag)
    }

    /// One virtio-mmio transport, named `VRnn` as in QEMU's microvm.
    static func virtioMMIODevice(index: Int, _ d: ACPIMMIODevice) throws -> [UInt8] {
        guard index >= 0, index < 100 else {
            throw MicroVMError.invalidArgument("too many virtio-mmio devices for ACPI: at most 100")
        }
        guard d.base <= UInt64(UInt32.max), d.length >= 1, d.length <= UInt64(UInt32.max), d.base + d.length - 1 <= UInt64(UInt32.max) else {
            throw MicroVMError(.internalError, "virtio-mmio window \(d.base)+\(d.length) does not fit Memory32Fixed (below 4 GiB)")
        }
        let n = index < 10 ? "VR0\(index)" : "VR\(index)"
        let crs = try resourceTemplate(memory32Fixed(base: UInt32(d.base), length: UInt32(d.length)) + extendedInterrupt(gsi: d.gsi))
        let body = try name("_HID", string("LNRO0005"))
            + name("_UID", integer(UInt64(index)))
            + name("_CCA", integer(1))
            + name("_CRS", crs)
        return try device(n, body)
    }

    /// `EisaId ("PNP0501")`: three letters in 5 bits each and four hex digits, byte-swapped
    /// into a DWordConst (iasl never shortens it).
    static func eisaID(_ id: String) throws -> [UInt8] {
        let c = Array(id.utf8)
        guard c.count == 7, c[0..<3].allSatisfy({ $0 >= 0x41 && $0 <= 0x5a }),
              let digits = UInt16(String(decoding: c[3...], as: UTF8.self), radix: 16) else {
            throw MicroVMError(.internalError, "\(id) is not an EISA id (three capitals, four hex digits)")
        }
        let letters = UInt16(c[0] - 0x40) << 10 | UInt16(c[1] - 0x40) << 5 | UInt16(c[2] - 0x40)
        return [dwordPrefix, UInt8(letters >> 8), UInt8(letters & 0xff), UInt8(digits >> 8), UInt8(digits & 0xff)]
    }

    /// `IO (Decode16, port, port, alignment, length)`: a fixed range of I/O ports.
    static func io16(port: UInt16, length: UInt8, alignment: UInt8) -> [UInt8] {
        [0x47, 1] + le(UInt64(port), 2) + le(UInt64(port), 2) + [alignment, length]
    }

    /// `IRQNoFlags () {irq}`: an ISA interrupt, edge triggered, active high.
    static func irqNoFlags(_ irq: Int) -> [UInt8] {
        [0x22] + le(UInt64(1) << UInt64(irq), 2)
    }

    /// COM1 (`PNP0501`, ports 0x3F8–0x3FF, IRQ 4) and the i8042 keyboard controller (`PNP0303`,
    /// ports 0x60 and 0x64, IRQ 1). On a hardware-reduced platform Linux sets up no legacy ISA
    /// interrupts, so a device that firmware does not describe never gets its IRQ: the 8250
    /// driver then polls nothing and user space's console output stalls. Described here, the
    /// PNP drivers map IRQ 4 and IRQ 1 through the IOAPIC, as QEMU's microvm and Firecracker do.
    static func legacyDevices() throws -> [UInt8] {
        let com1 = try name("_HID", eisaID("PNP0501"))
            + name("_UID", integer(1))
            + name("_CRS", resourceTemplate(io16(port: 0x3f8, length: 8, alignment: 8) + irqNoFlags(4)))
        let kbd = try name("_HID", eisaID("PNP0303"))
            + name("_CRS", resourceTemplate(io16(port: 0x60, length: 1, alignment: 1) + io16(port: 0x64, length: 1, alignment: 1) + irqNoFlags(1)))
        return try device("COM1", com1) + device("PS2K", kbd)
    }

    static func le(_ v: UInt64, _ bytes: Int) -> [UInt8] {
        (0..<bytes).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) }
    }
}
