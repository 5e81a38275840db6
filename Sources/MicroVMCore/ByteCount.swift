/// A size in bytes, parsed from and printed as "128M", "1G", "512K" or a plain number of bytes.
public struct ByteCount: Hashable, Comparable, Sendable, Codable, CustomStringConvertible, ExpressibleByIntegerLiteral {
    public var bytes: UInt64
    public init(_ bytes: UInt64) { self.bytes = bytes }
    public init(integerLiteral value: UInt64) { self.bytes = value }

    // Sizes can come from a guest (its balloon statistics): they saturate instead of wrapping.
    public static func kibibytes(_ n: UInt64) -> ByteCount { ByteCount(n > UInt64.max >> 10 ? .max : n << 10) }
    public static func mebibytes(_ n: UInt64) -> ByteCount { ByteCount(n > UInt64.max >> 20 ? .max : n << 20) }
    public static func gibibytes(_ n: UInt64) -> ByteCount { ByteCount(n > UInt64.max >> 30 ? .max : n << 30) }

    public var mebibytes: UInt64 { bytes >> 20 }
    public var kibibytes: UInt64 { bytes >> 10 }

    public static func < (a: ByteCount, b: ByteCount) -> Bool { a.bytes < b.bytes }
    public static func + (a: ByteCount, b: ByteCount) -> ByteCount {
        let (sum, overflow) = a.bytes.addingReportingOverflow(b.bytes)
        return ByteCount(overflow ? .max : sum)
    }
    public static func - (a: ByteCount, b: ByteCount) -> ByteCount { ByteCount(a.bytes >= b.bytes ? a.bytes - b.bytes : 0) }

    /// Parses "128M", "128MiB", "1G", "2048k", "4096". Units are binary (K = 1024).
    public init(parsing text: String) throws {
        let t = text.trimmed()
        let digits = t.prefix { $0.isNumber }
        var unit = t.dropFirst(digits.count).lowercased()
        if unit.hasSuffix("ib") { unit.removeLast(2) } else if unit.hasSuffix("b") && unit.count > 1 { unit.removeLast() }
        guard let n = UInt64(digits), !digits.isEmpty else {
            throw MicroVMError.invalidArgument("'\(text)' is not a size: write a number with an optional unit, e.g. 128M or 2G")
        }
        let shift: UInt64
        switch unit {
        case "", "b": shift = 0
        case "k": shift = 10
        case "m": shift = 20
        case "g": shift = 30
        case "t": shift = 40
        default:
            throw MicroVMError.invalidArgument("'\(text)' has an unknown size unit '\(unit)': use K, M, G or T")
        }
        guard n <= (UInt64.max >> shift) else {
            throw MicroVMError.invalidArgument("'\(text)' is too large")
        }
        self.bytes = n << shift
    }

    public var description: String {
        for (s, u) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] where bytes >= (1 << s) && bytes % (1 << s) == 0 {
            return "\(bytes >> UInt64(s))\(u)"
        }
        return "\(bytes)"
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if let n = try? c.decode(UInt64.self) { self.init(n) } else { try self.init(parsing: c.decode(String.self)) }
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(description)
    }
}

import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
