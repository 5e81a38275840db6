import MicroVMCore

/// A request that cannot be carried out: its status and Firecracker's `fault_message`.
struct APIFault: Error {
    var status: Int
    var message: String
    init(_ message: String, status: Int = 400) { self.status = status; self.message = message }
}

/// Request bodies, read with errors that name the offending field the way Firecracker's
/// (serde's) messages do: unknown fields are refused, as Firecracker refuses them.
enum JSONBody {
    /// `request`'s body, which must be a JSON object, read as `type`.
    static func read<T: JSONReadable>(_ type: T.Type, _ request: HTTPRequest) throws(APIFault) -> T {
        let what = "\(request.method) \(request.path)"
        guard !request.body.allSatisfy({ $0 == 32 || $0 == 9 || $0 == 10 || $0 == 13 }) else {
            throw APIFault("\(what) needs a JSON body")
        }
        do {
            return try T(json: JSONFields(parsing: request.body))
        } catch {
            throw APIFault("\(what): \(error.message)")
        }
    }
}
