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
    static func decode<T: Decodable>(_ type: T.Type, from request: HTTPRequest, allowed: [String]) throws(APIFault) -> T {
        let what = "\(request.method) \(request.path)"
        guard !request.body.allSatisfy({ $0 == 32 || $0 == 9 || $0 == 10 || $0 == 13 }) else {
            throw APIFault("\(what) needs a JSON body")
        }
        let data = Data(request.body)
        let keys: [String]
        do {
            keys = try JSONDecoder().decode(ObjectKeys.self, from: data).keys
        } catch {
            throw APIFault("\(what): \(describe(error))")
        }
        if let unknown = keys.first(where: { !allowed.contains($0) }) {
            throw APIFault("\(what): unknown field `\(unknown)`, expected one of: \(allowed.map { "`\($0)`" }.joined(separator: ", "))")
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

    /// The keys of a JSON object, whatever their values.
    private struct ObjectKeys: Decodable {
        var keys: [String]
        init(from decoder: any Decoder) throws {
            keys = try decoder.container(keyedBy: AnyKey.self).allKeys.map(\.stringValue)
        }
    }

    private struct AnyKey: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }
}
