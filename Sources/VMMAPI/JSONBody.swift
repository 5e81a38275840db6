import FoundationEssentials

/// A request that cannot be carried out: its status and Firecracker's `fault_message`.
struct APIFault: Error {
    var status: Int
    var message: String
    init(_ message: String, status: Int = 400) { self.status = status; self.message = message }
}

/// Decoding request bodies with errors that name the offending field, the way Firecracker's
/// (serde's) messages do: unknown fields are refused, as Firecracker refuses them.
enum JSONBody {
    /// `T` from `request`'s body, which must be a JSON object with no keys outside `allowed`.
    /// `integers` names the integer fields and their ranges: JSONDecoder reports a fraction or an
    /// out-of-range number only as invalid JSON, so these are checked first to name the field.
    static func decode<T: Decodable>(_ type: T.Type, from request: HTTPRequest, allowed: [String],
                                     integers: [String: ClosedRange<Double>] = [:]) throws(APIFault) -> T {
        let what = "\(request.method) \(request.path)"
        guard !request.body.allSatisfy({ $0 == 32 || $0 == 9 || $0 == 10 || $0 == 13 }) else {
            throw APIFault("\(what) needs a JSON body")
        }
        let data = Data(request.body)
        let object: [String: JSONValue]
        do {
            object = try JSONDecoder().decode([String: JSONValue].self, from: data)
        } catch {
            throw APIFault("\(what): \(describe(error))")
        }
        if let unknown = object.keys.sorted().first(where: { !allowed.contains($0) }) {
            throw APIFault("\(what): unknown field `\(unknown)`, expected one of: \(allowed.map { "`\($0)`" }.joined(separator: ", "))")
        }
        for (key, range) in integers.sorted(by: { $0.key < $1.key }) {
            guard case .number(let n)? = object[key] else { continue }
            guard n.rounded() == n, range.contains(n) else {
                let bounds = "\(Int64(range.lowerBound))...\(Int64(range.upperBound))"
                throw APIFault("\(what): field `\(key)` must be an integer in \(bounds) (got \(n))")
            }
        }
        do {
            return try JSONDecoder().decode(T.self, from: data)
        } catch {
            throw APIFault("\(what): \(describe(error))")
        }
    }

    /// A decoding error in words, naming the field it is about.
    static func describe(_ error: any Error) -> String {
        guard let error = error as? DecodingError else { return "invalid body: \(error)" }
        func field(_ path: [any CodingKey]) -> String {
            path.map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }.joined(separator: ".").replacing(".[", with: "[")
        }
        switch error {
        case .keyNotFound(let key, let context):
            let inner = context.codingPath.isEmpty ? "" : " in `\(field(context.codingPath))`"
            return "missing required field `\(key.stringValue)`\(inner)"
        case .typeMismatch(let type, let context):
            if context.codingPath.isEmpty { return "the body must be a JSON object" }
            return "field `\(field(context.codingPath))` must be \(jsonType(type))"
        case .valueNotFound(let type, let context):
            return "field `\(field(context.codingPath))` must be \(jsonType(type)), not null"
        case .dataCorrupted(let context):
            if context.codingPath.isEmpty {
                let detail = context.underlyingError.map { ": \($0)" } ?? ""
                return "the body is not valid JSON (\(context.debugDescription)\(detail))"
            }
            return "field `\(field(context.codingPath))` is invalid: \(context.debugDescription)"
        @unknown default:
            return "invalid body: \(error)"
        }
    }

    private static func jsonType(_ type: Any.Type) -> String {
        switch type {
        case is String.Type: "a string"
        case is Bool.Type: "a boolean"
        case is Int.Type, is UInt32.Type, is Int64.Type, is UInt64.Type: "an integer"
        case is Double.Type: "a number"
        default: "a JSON \(type)"
        }
    }

    /// Any JSON value; numbers as Double, which is enough to check them.
    enum JSONValue: Decodable {
        case null, bool(Bool), number(Double), string(String), array([JSONValue]), object([String: JSONValue])

        init(from decoder: any Decoder) throws {
            let c = try decoder.singleValueContainer()
            if c.decodeNil() { self = .null }
            else if let b = try? c.decode(Bool.self) { self = .bool(b) }
            else if let n = try? c.decode(Double.self) { self = .number(n) }
            else if let s = try? c.decode(String.self) { self = .string(s) }
            else if let a = try? c.decode([JSONValue].self) { self = .array(a) }
            else { self = .object(try c.decode([String: JSONValue].self)) }
        }
    }
}
