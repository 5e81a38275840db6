/// A JSON document as a value, parsed by a small parser of our own.
///
/// The VMM reads its configuration file, the API's request bodies and the per-boot KVM verdict
/// through this instead of Codable: Codable's first use instantiates generic metadata and looks
/// up protocol conformances at run time, about a millisecond on the way to a VM's first
/// instruction. Numbers are kept as Double, exact for integers up to 2^53.
public enum JSONValue: Sendable, Equatable {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    /// Nesting deeper than this is refused: the parser recurses, and its input may be hostile.
    public static let maxDepth = 64

    /// The document in `bytes` (RFC 8259; one value, white space around it). Duplicate keys
    /// are refused rather than one silently winning.
    public init(parsing bytes: some Collection<UInt8>) throws(JSONSyntaxError) {
        var parser = JSONParser(bytes: Array(bytes))
        self = try parser.document()
    }

    /// What the value is, for messages: "an object", "a string"…
    public var kind: String {
        switch self {
        case .null: "null"
        case .bool: "a boolean"
        case .number: "a number"
        case .string: "a string"
        case .array: "an array"
        case .object: "an object"
        }
    }
}

/// Why a document is not JSON, and where.
public struct JSONSyntaxError: Error, Sendable, Equatable, CustomStringConvertible {
    public var problem: String
    public var offset: Int
    public var description: String { "\(problem) at byte \(offset)" }
}

private struct JSONParser {
    let bytes: [UInt8]
    var at = 0

    init(bytes: [UInt8]) { self.bytes = bytes }

    mutating func document() throws(JSONSyntaxError) -> JSONValue {
        skipSpace()
        let v = try value(depth: 0)
        skipSpace()
        guard at == bytes.count else { throw fail("unexpected text after the value") }
        return v
    }

    func fail(_ problem: String) -> JSONSyntaxError { JSONSyntaxError(problem: problem, offset: at) }

    mutating func skipSpace() {
        while at < bytes.count, bytes[at] == 0x20 || bytes[at] == 0x0A || bytes[at] == 0x0D || bytes[at] == 0x09 { at += 1 }
    }

    mutating func value(depth: Int) throws(JSONSyntaxError) -> JSONValue {
        guard at < bytes.count else { throw fail("unexpected end of the document") }
        switch bytes[at] {
        case UInt8(ascii: "{"): return try object(depth: depth + 1)
        case UInt8(ascii: "["): return try array(depth: depth + 1)
        case UInt8(ascii: "\""): return .string(try string())
        case UInt8(ascii: "t"): try literal("true"); return .bool(true)
        case UInt8(ascii: "f"): try literal("false"); return .bool(false)
        case UInt8(ascii: "n"): try literal("null"); return .null
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return .number(try number())
        default: throw fail("unexpected character '\(Unicode.Scalar(bytes[at]).escaped(asASCII: true))'")
        }
    }

    mutating func literal(_ word: String) throws(JSONSyntaxError) {
        let n = word.utf8.count
        guard bytes.count - at >= n, word.utf8.elementsEqual(bytes[at..<at + n]) else {
            throw fail("invalid literal (expected \(word))")
        }
        at += n
    }

    mutating func object(depth: Int) throws(JSONSyntaxError) -> JSONValue {
        guard depth <= JSONValue.maxDepth else { throw fail("nested deeper than \(JSONValue.maxDepth) levels") }
        at += 1
        var fields: [String: JSONValue] = [:]
        skipSpace()
        if at < bytes.count, bytes[at] == UInt8(ascii: "}") { at += 1; return .object(fields) }
        while true {
            skipSpace()
            guard at < bytes.count, bytes[at] == UInt8(ascii: "\"") else { throw fail("expected a key in double quotes") }
            let keyAt = at
            let key = try string()
            skipSpace()
            guard at < bytes.count, bytes[at] == UInt8(ascii: ":") else { throw fail("expected ':' after the key") }
            at += 1
            skipSpace()
            let v = try value(depth: depth)
            guard fields.updateValue(v, forKey: key) == nil else {
                throw JSONSyntaxError(problem: "duplicate key \"\(key)\"", offset: keyAt)
            }
            skipSpace()
            guard at < bytes.count else { throw fail("unexpected end of the document in an object") }
            if bytes[at] == UInt8(ascii: "}") { at += 1; return .object(fields) }
            guard bytes[at] == UInt8(ascii: ",") else { throw fail("expected ',' or '}' in an object") }
            at += 1
        }
    }

    mutating func array(depth: Int) throws(JSONSyntaxError) -> JSONValue {
        guard depth <= JSONValue.maxDepth else { throw fail("nested deeper than \(JSONValue.maxDepth) levels") }
        at += 1
        var items: [JSONValue] = []
        skipSpace()
        if at < bytes.count, bytes[at] == UInt8(ascii: "]") { at += 1; return .array(items) }
        while true {
            skipSpace()
            items.append(try value(depth: depth))
            skipSpace()
            guard at < bytes.count else { throw fail("unexpected end of the document in an array") }
            if bytes[at] == UInt8(ascii: "]") { at += 1; return .array(items) }
            guard bytes[at] == UInt8(ascii: ",") else { throw fail("expected ',' or ']' in an array") }
            at += 1
        }
    }

    /// A string from its opening quote; escapes decoded, UTF-8 checked.
    mutating func string() throws(JSONSyntaxError) -> String {
        let start = at
        at += 1
        var out: [UInt8] = []
        var runStart = at
        while true {
            guard at < bytes.count else { throw JSONSyntaxError(problem: "unterminated string", offset: start) }
            let b = bytes[at]
            if b == UInt8(ascii: "\"") { break }
            if b < 0x20 { throw fail("control character in a string (escape it)") }
            if b != UInt8(ascii: "\\") { at += 1; continue }
            out += bytes[runStart..<at]
            at += 1
            guard at < bytes.count else { throw JSONSyntaxError(problem: "unterminated string", offset: start) }
            let e = bytes[at]
            at += 1
            switch e {
            case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): out.append(e)
            case UInt8(ascii: "b"): out.append(0x08)
            case UInt8(ascii: "f"): out.append(0x0C)
            case UInt8(ascii: "n"): out.append(0x0A)
            case UInt8(ascii: "r"): out.append(0x0D)
            case UInt8(ascii: "t"): out.append(0x09)
            case UInt8(ascii: "u"):
                var scalar = try hex4()
                if (0xD800..<0xDC00).contains(scalar) {
                    guard bytes.count - at >= 6, bytes[at] == UInt8(ascii: "\\"), bytes[at + 1] == UInt8(ascii: "u") else {
                        throw fail("unpaired surrogate in a \\u escape")
                    }
                    at += 2
                    let low = try hex4()
                    guard (0xDC00..<0xE000).contains(low) else { throw fail("unpaired surrogate in a \\u escape") }
                    scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                }
                guard let u = Unicode.Scalar(scalar) else { throw fail("unpaired surrogate in a \\u escape") }
                out += Array(String(Character(u)).utf8)
            default: throw fail("invalid escape '\\\(Unicode.Scalar(e).escaped(asASCII: true))'")
            }
            runStart = at
        }
        let text: String?
        if out.isEmpty {
            text = String(validating: bytes[runStart..<at], as: UTF8.self)
        } else {
            out += bytes[runStart..<at]
            text = String(validating: out, as: UTF8.self)
        }
        guard let text else { throw JSONSyntaxError(problem: "invalid UTF-8 in a string", offset: start) }
        at += 1
        return text
    }

    mutating func hex4() throws(JSONSyntaxError) -> UInt32 {
        guard bytes.count - at >= 4 else { throw fail("incomplete \\u escape") }
        var v: UInt32 = 0
        for b in bytes[at..<at + 4] {
            let d: UInt8
            switch b {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): d = b - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): d = b - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): d = b - UInt8(ascii: "A") + 10
            default: throw fail("invalid \\u escape")
            }
            v = v << 4 | UInt32(d)
        }
        at += 4
        return v
    }

    /// -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?, finite.
    mutating func number() throws(JSONSyntaxError) -> Double {
        let start = at
        func digits(_ p: inout JSONParser) -> Int {
            let s = p.at
            while p.at < p.bytes.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(p.bytes[p.at]) { p.at += 1 }
            return p.at - s
        }
        if bytes[at] == UInt8(ascii: "-") { at += 1 }
        let leadingZero = at < bytes.count && bytes[at] == UInt8(ascii: "0")
        let whole = digits(&self)
        guard whole > 0 else { throw fail("invalid number") }
        guard !(leadingZero && whole > 1) else { throw JSONSyntaxError(problem: "invalid number (leading zero)", offset: start) }
        if at < bytes.count, bytes[at] == UInt8(ascii: ".") {
            at += 1
            guard digits(&self) > 0 else { throw fail("invalid number (no digit after '.')") }
        }
        if at < bytes.count, bytes[at] == UInt8(ascii: "e") || bytes[at] == UInt8(ascii: "E") {
            at += 1
            if at < bytes.count, bytes[at] == UInt8(ascii: "+") || bytes[at] == UInt8(ascii: "-") { at += 1 }
            guard digits(&self) > 0 else { throw fail("invalid number (no digit in the exponent)") }
        }
        guard let d = Double(String(decoding: bytes[start..<at], as: UTF8.self)), d.isFinite else {
            throw JSONSyntaxError(problem: "number out of range", offset: start)
        }
        return d
    }
}

/// A JSON object read field by field, with errors that name the field by its path from the
/// document's root (`machine-config.vcpu_count`, `drives[1].path_on_host`), as serde's do.
public struct JSONFields: Sendable {
    public let values: [String: JSONValue]
    /// Where this object is in the document: "" at the root.
    public let path: String

    /// `value`, which must be an object, at `path`.
    public init(_ value: JSONValue, path: String = "") throws(JSONFieldError) {
        guard case .object(let o) = value else {
            throw JSONFieldError(path.isEmpty ? "the document must be a JSON object, not \(value.kind)" : "field `\(path)` must be an object, not \(value.kind)")
        }
        values = o
        self.path = path
    }

    /// The document in `bytes`, whose root must be an object.
    public init(parsing bytes: some Collection<UInt8>) throws(JSONFieldError) {
        let v: JSONValue
        do { v = try JSONValue(parsing: bytes) } catch { throw JSONFieldError("not valid JSON (\(error))") }
        try self.init(v)
    }

    func name(_ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    /// Refuses any key outside `allowed`, as Firecracker refuses unknown fields.
    public func refuseUnknown(_ allowed: [String]) throws(JSONFieldError) {
        guard let unknown = values.keys.sorted().first(where: { !allowed.contains($0) }) else { return }
        throw JSONFieldError("unknown field `\(name(unknown))`, expected one of: \(allowed.map { "`\($0)`" }.joined(separator: ", "))")
    }

    /// The value at `key`; nil when absent or null.
    public subscript(key: String) -> JSONValue? {
        switch values[key] {
        case nil, .null?: nil
        case let v?: v
        }
    }

    func mismatch(_ key: String, _ what: String) -> JSONFieldError {
        JSONFieldError("field `\(name(key))` must be \(what), not \(values[key]?.kind ?? "absent")")
    }

    /// A field that must be present: `read` gives nil only when it is absent or null.
    public func required<T>(_ key: String, _ read: (String) throws(JSONFieldError) -> T?) throws(JSONFieldError) -> T {
        guard let v = try read(key) else {
            if case .null? = values[key] { throw JSONFieldError("field `\(name(key))` must not be null") }
            throw JSONFieldError("missing required field `\(key)`" + (path.isEmpty ? "" : " in `\(path)`"))
        }
        return v
    }

    /// The value at `key` as `extract` takes it (nil when absent or null), or an error naming
    /// what it must be.
    private func typed<T>(_ key: String, _ what: String, _ extract: (JSONValue) -> T?) throws(JSONFieldError) -> T? {
        guard let v = self[key] else { return nil }
        guard let t = extract(v) else { throw mismatch(key, what) }
        return t
    }

    public func string(_ key: String) throws(JSONFieldError) -> String? {
        try typed(key, "a string") { switch $0 { case .string(let s): s; default: nil } }
    }

    public func bool(_ key: String) throws(JSONFieldError) -> Bool? {
        try typed(key, "a boolean") { switch $0 { case .bool(let b): b; default: nil } }
    }

    public func number(_ key: String) throws(JSONFieldError) -> Double? {
        try typed(key, "a number") { switch $0 { case .number(let n): n; default: nil } }
    }

    /// An integer field within `range` (a fraction, or a number outside it, is refused by name).
    public func integer<T: FixedWidthInteger>(_ key: String, in range: ClosedRange<T>) throws(JSONFieldError) -> T? {
        guard let n = try typed(key, "an integer", { switch $0 { case .number(let n): n; default: nil } }) else { return nil }
        guard n.rounded() == n, n >= Double(range.lowerBound), n <= Double(range.upperBound), let i = T(exactly: n) else {
            throw JSONFieldError("field `\(name(key))` must be an integer in \(range.lowerBound)...\(range.upperBound) (got \(n))")
        }
        return i
    }

    public func integer(_ key: String) throws(JSONFieldError) -> Int? {
        try integer(key, in: -(1 << 53)...(1 << 53))
    }

    public func object(_ key: String) throws(JSONFieldError) -> JSONFields? {
        guard let v = self[key] else { return nil }
        return try JSONFields(v, path: name(key))
    }

    /// An object field read as `type`.
    public func object<T: JSONReadable>(_ key: String, as type: T.Type) throws(JSONFieldError) -> T? {
        guard let f = try object(key) else { return nil }
        return try T(json: f)
    }

    /// An array field, each element read by `element` with its index in the path.
    public func array<T>(_ key: String, _ element: (JSONValue, String) throws(JSONFieldError) -> T) throws(JSONFieldError) -> [T]? {
        guard let v = self[key] else { return nil }
        guard case .array(let items) = v else { throw mismatch(key, "an array") }
        var out: [T] = []
        out.reserveCapacity(items.count)
        for (i, item) in items.enumerated() { out.append(try element(item, "\(name(key))[\(i)]")) }
        return out
    }

    /// An array of objects, each read as `type`.
    public func objects<T: JSONReadable>(_ key: String, as type: T.Type) throws(JSONFieldError) -> [T]? {
        try array(key) { (item, path) throws(JSONFieldError) in try T(json: JSONFields(item, path: path)) }
    }
}

/// What reads itself from a JSON object, field by field.
public protocol JSONReadable {
    init(json: JSONFields) throws(JSONFieldError)
}

/// A field of a JSON document that is missing, of the wrong type or unknown, in words.
public struct JSONFieldError: Error, Sendable, Equatable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
