/// Libvirt: hosted mode — QEMU guests driven through libvirt's C API. Owns the bindings
/// (`LibvirtConnection`, `LibvirtDomain`), the typed domain XML builder (`DomainXML`) and
/// `HostedBackend`, the `InstanceBackend` for `mvm run --mode hosted`.
///
/// ```swift
/// // The embedded QEMU driver: no daemon, state under Paths.default.libvirtRoot.
/// let result = try await HostedBackend().run(VMSpec(memory: .mebibytes(128), command: ["uname", "-r"]))
/// print(result.output, result.exitStatus)
///
/// // The bindings alone, against libvirt's in-process test driver.
/// let conn = try LibvirtConnection.open("test:///default")
/// print(try conn.listDomains().map(\.name))
/// ```
import CLibvirt
import Foundation
import MicroVMCore

/// Process-wide libvirt set-up that must happen once, before the first connection: the default
/// event loop (lifecycle events and the embedded driver's QEMU monitor both need one running)
/// and silencing libvirt's habit of printing every error to stderr — errors reach callers as
/// `MicroVMError` instead.
enum LibvirtRuntime {
    private static let started: Bool = {
        // SAFETY: libvirt copies nothing from the handler; a no-op with C linkage is valid for any error.
        virSetErrorFunc(nil, silentErrorHandler)
        guard virInitialize() == 0, virEventRegisterDefaultImpl() == 0 else { return false }
        let loop = Thread {
            while true {
                // A failed iteration (EINTR, a closed fd) is not fatal: the next one carries on.
                if virEventRunDefaultImpl() != 0 { usleep(1000) }
            }
        }
        loop.name = "libvirt-event-loop"
        loop.start()
        return true
    }()

    /// Starts libvirt once per process. Its own log (a banner, warnings, and errors that also
    /// come back through the API, where we report them with their context) goes to `logFile`
    /// when given, else only its errors to stderr; LIBVIRT_LOG_OUTPUTS set by the user wins.
    /// Only the first call's `logFile` counts.
    static func start(logFile: String? = nil) throws {
        if let logFile { try? Paths.ensureDirectory((logFile as NSString).deletingLastPathComponent) }
        setenv("LIBVIRT_LOG_OUTPUTS", logFile.map { "3:file:\($0)" } ?? "4:stderr", 0)
        guard started else {
            throw MicroVMError(.backend, "libvirt could not initialise its event loop: \(LibvirtFailure.last().message)")
        }
    }
}

private func silentErrorHandler(_ userData: UnsafeMutableRawPointer?, _ error: virErrorPtr?) {}

/// libvirt's last error, copied out of its thread-local slot. It must be read on the thread
/// that made the failing call, before any other libvirt call — so only the synchronous
/// wrappers in this module create one, right after the call that failed.
struct LibvirtFailure: Sendable {
    var code: Int32
    var domain: Int32
    var message: String

    static func last() -> LibvirtFailure {
        guard let e = virGetLastError() else {
            return LibvirtFailure(code: 0, domain: 0, message: "libvirt reported a failure without an error message")
        }
        let text = e.pointee.message.map { String(cString: $0) } ?? "unknown libvirt error \(e.pointee.code)"
        let f = LibvirtFailure(code: e.pointee.code, domain: e.pointee.domain, message: text)
        virResetLastError()
        return f
    }

    func `is`(_ number: virErrorNumber) -> Bool { code == Int32(bitPattern: number.rawValue) }

    /// The project's error for a failed operation, keeping libvirt's own words as the message tail.
    func error(_ what: String, fix: String? = nil) -> MicroVMError {
        let code: MicroVMError.Code
        if `is`(VIR_ERR_NO_DOMAIN) { code = .notFound }
        else if `is`(VIR_ERR_XML_ERROR) || `is`(VIR_ERR_INVALID_ARG) || `is`(VIR_ERR_CONFIG_UNSUPPORTED) { code = .invalidArgument }
        else if `is`(VIR_ERR_AUTH_FAILED) || `is`(VIR_ERR_ACCESS_DENIED) || `is`(VIR_ERR_AUTH_UNAVAILABLE) { code = .permissionDenied }
        else if `is`(VIR_ERR_NO_SUPPORT) { code = .unsupported }
        else if `is`(VIR_ERR_OPERATION_TIMEOUT) { code = .timeout }
        else { code = .backend }
        return MicroVMError(code, "\(what): \(message)" + (fix.map { ". \($0)" } ?? ""))
    }
}
