import Foundation
import MicroVMCore
import Host

/// Which engine runs a container. A string literal names one: "runc", "crun", "docker",
/// "auto", or a path to an OCI runtime binary with runc's command line.
public enum ContainerRuntime: Sendable, Hashable, ExpressibleByStringLiteral, CustomStringConvertible {
    /// runsc's global network flag: the sandbox's own stack in the spec's namespace, or none
    /// (gVisor will not set one up in a namespace it did not make).
    public static func runscNetwork(sandbox: Bool) -> String { "--network=\(sandbox ? "sandbox" : "none")" }

    /// crun where this host's cgroup layout lets it work, else runc.
    case automatic
    case runc
    case crun
    /// gVisor's runsc: a user-space kernel between the container and the host (ptrace platform).
    case runsc
    /// Debian's docker.io engine, fed from the rootfs tarball (no registry needed).
    case docker
    /// Any runtime with runc's command line, by path.
    case oci(path: String)

    public init(stringLiteral value: String) { self.init(parsing: value) }

    public init(parsing text: String) {
        switch text {
        case "auto", "automatic", "": self = .automatic
        case "runc": self = .runc
        case "crun": self = .crun
        case "runsc", "gvisor": self = .runsc
        case "docker": self = .docker
        default: self = .oci(path: text)
        }
    }

    public var description: String {
        switch self {
        case .automatic: "auto"
        case .runc: "runc"
        case .crun: "crun"
        case .runsc: "runsc"
        case .docker: "docker"
        case .oci(let path): path
        }
    }

    /// The OCI runtime binary to drive, after checking this host can use it. Throws one error
    /// naming the fix when it cannot (missing binary, crun on a hybrid cgroup layout).
    func resolveOCI(profile: () -> HostProfile) throws -> (name: String, path: String) {
        switch self {
        case .docker:
            throw MicroVMError(.internalError, "docker is not an OCI runtime binary")
        case .runc:
            return ("runc", try Self.locate("runc", package: "runc"))
        case .runsc:
            return ("runsc", try Self.locate("runsc", package: "runsc"))
        case .crun:
            let cap = profile().capability("crun")
            guard cap.usable else {
                throw MicroVMError(.unsupported, "crun cannot run containers on this host: \(cap.detail); fix: \(cap.fix ?? "use --runtime runc")")
            }
            return ("crun", try Self.locate("crun", package: "crun"))
        case .automatic:
            if profile().capability("crun").usable, let p = ProcessRunner.which("crun") { return ("crun", p) }
            return ("runc", try Self.locate("runc", package: "runc"))
        case .oci(let path):
            guard FileManager.default.isExecutableFile(atPath: path) || (!path.contains("/") && ProcessRunner.which(path) != nil) else {
                throw MicroVMError.notFound("container runtime '\(path)' does not exist or is not executable: install runc (apt-get install runc) or pass an existing runtime path")
            }
            return ((path as NSString).lastPathComponent, ProcessRunner.which(path) ?? path)
        }
    }

    static func locate(_ name: String, package: String) throws -> String {
        guard let p = ProcessRunner.which(name) else {
            throw MicroVMError.notFound("container runtime '\(name)' is not installed: apt-get install \(package)")
        }
        return p
    }
}

/// The host profile costs a probe of every tool; a container start must not pay it each time.
enum CachedProfile {
    private static let lock = NSLock()
    nonisolated(unsafe) private static var cached: HostProfile?
    static func get() -> HostProfile {
        lock.lock(); defer { lock.unlock() }
        if let c = cached { return c }
        let p = HostProfile.current()
        cached = p
        return p
    }
}

/// Drives an OCI runtime through its command line, with its state under our own `--root`
/// so every container MicroVM made can be listed and reaped.
struct OCIRuntimeDriver: Sendable {
    var executable: String
    var root: String

    /// gVisor's runsc takes runc's commands, with its own global flags: the network stack (none,
    /// or the sandbox's namespace from the spec) and no host cgroup v2 requirement.
    var isRunsc: Bool { (executable as NSString).lastPathComponent == "runsc" }

    /// runsc keeps its state in a layout of its own: it gets a root of its own beside runc's.
    var stateRoot: String { isRunsc ? root + "-runsc" : root }

    /// The flags before the command: the state root, and runsc's network.
    func globalArguments(network: Bool = false) -> [String] {
        ["--root", stateRoot] + (isRunsc ? [ContainerRuntime.runscNetwork(sandbox: network)] : [])
    }

    func command(_ args: [String]) -> [String] { [executable] + globalArguments() + args }

    /// Whether the runtime still holds state for `id`.
    func hasState(_ id: String) -> Bool {
        guard isRunsc else { return FileManager.default.fileExists(atPath: root + "/" + id) }
        return ((try? FileManager.default.contentsOfDirectory(atPath: stateRoot)) ?? []).contains { $0.contains(id) }
    }

    struct State: Decodable, Sendable {
        var id: String
        var pid: Int32?
        var status: String
        var bundle: String?
        var created: String?
    }

    func state(_ id: String) -> State? {
        guard let out = try? ProcessRunner.run(command(["state", id]), timeout: 10), out.status == 0 else { return nil }
        return try? JSONDecoder().decode(State.self, from: out.stdout)
    }

    func list() -> [State] {
        guard let out = try? ProcessRunner.run(command(["list", "--format", "json"]), timeout: 10), out.status == 0 else { return [] }
        return (try? JSONDecoder().decode([State]?.self, from: out.stdout)).flatMap { $0 } ?? []
    }

    /// What a runtime's stderr says went wrong: the message of its last `level=error` line (runc's
    /// logrus format, `msg="…"`), else the text itself, trimmed.
    static func failure(_ stderr: String) -> String {
        let text = stderr.trimmingCharacters(in: .whitespacesAndNewlines)
        guard let line = text.split(separator: "\n").last(where: { $0.contains("level=error") }),
              let start = line.range(of: "msg=\"") else { return String(text.suffix(500)) }
        var msg = "", escaped = false
        for c in line[start.upperBound...] {
            if escaped { msg.append(c); escaped = false } else if c == "\\" { escaped = true } else if c == "\"" { break } else { msg.append(c) }
        }
        return msg
    }

    func kill(_ id: String, signal: String = "KILL") {
        _ = try? ProcessRunner.run(command(["kill", id, signal]), timeout: 10)
    }

    func delete(_ id: String) {
        _ = try? ProcessRunner.run(command(["delete", "--force", id]), timeout: 20)
    }
}
