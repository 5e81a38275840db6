/// MicroVMCore: the vocabulary every MicroVM module shares — errors, units, the VM spec,
/// the resource slice, the guest result protocol and the backend/instance protocols.
///
/// ```swift
/// let spec = try VMSpec(kernel: "/var/cache/microvm/vmlinuz", memory: .mebibytes(128), cpus: 1,
///                       command: ["uname", "-r"])
/// ```

/// One error type for the whole project: a stable code, a message that says what to do next,
/// and the underlying cause when there is one.
public struct MicroVMError: Error, CustomStringConvertible, Sendable, Equatable {
    public struct Code: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
        public let rawValue: String
        public init(rawValue: String) { self.rawValue = rawValue }
        public var description: String { rawValue }

        public static let invalidArgument = Code(rawValue: "invalid-argument")
        public static let notFound = Code(rawValue: "not-found")
        public static let unsupported = Code(rawValue: "unsupported")
        public static let permissionDenied = Code(rawValue: "permission-denied")
        public static let invalidImage = Code(rawValue: "invalid-image")
        public static let insufficientResources = Code(rawValue: "insufficient-resources")
        public static let guestError = Code(rawValue: "guest-error")
        public static let timeout = Code(rawValue: "timeout")
        public static let hypervisor = Code(rawValue: "hypervisor")
        public static let backend = Code(rawValue: "backend")
        public static let corruptState = Code(rawValue: "corrupt-state")
        public static let internalError = Code(rawValue: "internal")
    }

    public var code: Code
    public var message: String
    public var cause: String?

    public init(_ code: Code, _ message: String, cause: (any Error)? = nil) {
        self.code = code
        self.message = message
        self.cause = cause.map { String(describing: $0) }
    }

    public var description: String {
        if let cause { return "\(message) (\(cause))" }
        return message
    }

    public static func invalidArgument(_ m: String) -> MicroVMError { .init(.invalidArgument, m) }
    public static func notFound(_ m: String) -> MicroVMError { .init(.notFound, m) }
    public static func unsupported(_ m: String) -> MicroVMError { .init(.unsupported, m) }
}

/// A failed system call: which call, errno, and what to do about it.
public struct SystemCallError: Error, CustomStringConvertible, Sendable {
    public let call: String
    public let errno: Int32
    public let hint: String?
    public init(_ call: String, errno: Int32, hint: String? = nil) {
        self.call = call; self.errno = errno; self.hint = hint
    }
    public var description: String {
        let text = String(cString: strerror(errno))
        return "\(call) failed: \(text) (errno \(errno))" + (hint.map { ". \($0)" } ?? "")
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
