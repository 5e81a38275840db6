import Foundation
import Allocator

/// The OCI runtime specification's `config.json` (1.0.2), as far as MicroVM writes it.
/// Field names follow the spec exactly so `JSONEncoder` output is what runc and crun read;
/// optional fields stay out of the file when nil, as the spec's "OPTIONAL" demands.
public struct OCISpec: Codable, Sendable, Equatable {
    public var ociVersion: String
    public var process: Process
    public var root: Root
    public var hostname: String?
    public var mounts: [Mount]
    public var linux: Linux

    public init(ociVersion: String = "1.0.2", process: Process, root: Root, hostname: String?, mounts: [Mount], linux: Linux) {
        self.ociVersion = ociVersion; self.process = process; self.root = root
        self.hostname = hostname; self.mounts = mounts; self.linux = linux
    }

    public struct Process: Codable, Sendable, Equatable {
        public var terminal: Bool
        public var user: User
        public var args: [String]
        public var env: [String]
        public var cwd: String
        public var capabilities: Capabilities?
        public var rlimits: [RLimit]?
        public var noNewPrivileges: Bool?
    }

    public struct User: Codable, Sendable, Equatable {
        public var uid: UInt32
        public var gid: UInt32
    }

    public struct Capabilities: Codable, Sendable, Equatable {
        public var bounding: [String]
        public var effective: [String]
        public var inheritable: [String]
        public var permitted: [String]
        public var ambient: [String]
    }

    public struct RLimit: Codable, Sendable, Equatable {
        public var type: String
        public var hard: UInt64
        public var soft: UInt64
    }

    public struct Root: Codable, Sendable, Equatable {
        public var path: String
        public var readonly: Bool
    }

    public struct Mount: Codable, Sendable, Equatable {
        public var destination: String
        public var type: String?
        public var source: String?
        public var options: [String]?
    }

    public struct Linux: Codable, Sendable, Equatable {
        public var uidMappings: [IDMapping]?
        public var gidMappings: [IDMapping]?
        public var resources: Resources?
        public var cgroupsPath: String?
        public var namespaces: [Namespace]
        public var maskedPaths: [String]?
        public var readonlyPaths: [String]?
        public var seccomp: Seccomp?
    }

    public struct IDMapping: Codable, Sendable, Equatable {
        public var containerID: UInt32
        public var hostID: UInt32
        public var size: UInt32
    }

    public struct Namespace: Codable, Sendable, Equatable {
        public var type: String
        public var path: String?
        public init(type: String, path: String? = nil) { self.type = type; self.path = path }
    }

    public struct Resources: Codable, Sendable, Equatable {
        public var devices: [DeviceRule]?
        public var memory: Memory?
        public var cpu: CPU?
        public var pids: Pids?
    }

    public struct DeviceRule: Codable, Sendable, Equatable {
        public var allow: Bool
        public var access: String?
    }

    /// The allocator's encoding of a slice, field for field as config.json spells it.
    public typealias Memory = OCIResources.Memory
    public typealias CPU = OCIResources.CPU
    public typealias Pids = OCIResources.Pids

    public struct Seccomp: Codable, Sendable, Equatable {
        public var defaultAction: String
        public var architectures: [String]
        public var syscalls: [SyscallRule]
    }

    public struct SyscallRule: Codable, Sendable, Equatable {
        public var names: [String]
        public var action: String
        public var errnoRet: UInt32?
        public var args: [SyscallArg]?
    }

    public struct SyscallArg: Codable, Sendable, Equatable {
        public var index: UInt32
        public var value: UInt64
        public var valueTwo: UInt64?
        public var op: String
    }

    /// The file runc reads, pretty-printed so a person can read a kept bundle too.
    public func encoded() throws -> Data {
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        return try enc.encode(self)
    }
}
