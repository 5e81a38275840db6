import Foundation
import MicroVMCore
import Allocator

/// What a container gets besides its command: the choices `OCISpec.make` turns into config.json.
public struct ContainerOptions: Sendable, Equatable {
    /// The root filesystem tree; mounted read-only so the shared image tree is never changed.
    public var rootfs: String
    public var command: [String]
    public var hostname: String
    public var env: [String]
    /// The directory the command starts in.
    public var cwd: String = "/"
    /// cgroup path below the `microvm` parent, so leftovers can be found and reaped by name.
    public var cgroupsPath: String
    /// The granted slice as the runtime enforces it (`linux.resources`).
    public var enforcement: Enforcement?
    /// A network namespace to join (from `ip netns add`); nil gives a fresh, unconnected one.
    public var netnsPath: String?
    /// Maps container root to an unprivileged host range (user namespace).
    public var userNamespace: Bool
    /// Extra bind mounts (host source, container destination, read-only).
    public var binds: [(source: String, destination: String, readOnly: Bool)]

    public init(rootfs: String, command: [String], hostname: String, cgroupsPath: String, enforcement: Enforcement? = nil,
                env: [String] = ContainerOptions.defaultEnv, netnsPath: String? = nil, userNamespace: Bool = false,
                binds: [(source: String, destination: String, readOnly: Bool)] = []) {
        self.rootfs = rootfs; self.command = command; self.hostname = hostname; self.cgroupsPath = cgroupsPath
        self.enforcement = enforcement; self.env = env; self.netnsPath = netnsPath; self.userNamespace = userNamespace; self.binds = binds
    }

    public static let defaultEnv = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "TERM=dumb"]

    public static func == (a: ContainerOptions, b: ContainerOptions) -> Bool {
        a.rootfs == b.rootfs && a.command == b.command && a.hostname == b.hostname && a.env == b.env && a.cwd == b.cwd
            && a.cgroupsPath == b.cgroupsPath && a.enforcement == b.enforcement && a.netnsPath == b.netnsPath
            && a.userNamespace == b.userNamespace
            && a.binds.map { "\($0.source)|\($0.destination)|\($0.readOnly)" } == b.binds.map { "\($0.source)|\($0.destination)|\($0.readOnly)" }
    }
}

extension OCISpec {
    /// Docker's default capability set (moby's `oci/caps/defaults.go`): enough for ordinary
    /// programs, without CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_SYS_MODULE and the like.
    public static let defaultCapabilities = [
        "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
        "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
    ]

    /// Syscalls refused with EPERM whatever the capabilities: kernel modules and kexec, host-wide
    /// state (clock, swap, reboot, accounting), mounts and namespace escapes, and interfaces with a
    /// history of container breakouts (bpf, perf, userfaultfd, keyrings, ptrace, handles).
    /// The rootfs is set up before the filter applies, so denying mount here does not stop runc.
    public static let deniedSyscalls = [
        "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "create_module",
        "reboot", "swapon", "swapoff", "acct", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
        "mount", "umount2", "pivot_root", "unshare", "setns", "open_by_handle_at", "name_to_handle_at",
        "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
        "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
        "iopl", "ioperm", "syslog", "quotactl", "lookup_dcookie", "uselib", "vhangup", "sysfs", "_sysctl",
        "get_kernel_syms", "query_module", "nfsservctl", "fsopen", "fsmount", "fsconfig", "move_mount", "open_tree",
        // io_uring reaches kernel code paths that have been a steady source of privilege escalations;
        // the isolation audit found it allowed.
        "io_uring_setup", "io_uring_enter", "io_uring_register",
    ]

    public static let defaultSeccomp = Seccomp(
        defaultAction: "SCMP_ACT_ALLOW",
        architectures: ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        syscalls: [SyscallRule(names: deniedSyscalls, action: "SCMP_ACT_ERRNO", errnoRet: UInt32(EPERM), args: nil)])

    /// runc's `runc spec` lists: kernel interfaces that leak host information or allow host changes.
    public static let defaultMaskedPaths = [
        "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
        "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
    ]
    public static let defaultReadonlyPaths = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]

    /// Builds the config for one run-to-completion container.
    public static func make(_ o: ContainerOptions) throws -> OCISpec {
        guard !o.command.isEmpty, !o.command[0].isEmpty else {
            throw MicroVMError.invalidArgument("the container has no command: pass one, e.g. mvm run --mode container -- echo hello")
        }
        var mounts: [Mount] = [
            Mount(destination: "/proc", type: "proc", source: "proc", options: nil),
            Mount(destination: "/dev", type: "tmpfs", source: "tmpfs", options: ["nosuid", "strictatime", "mode=755", "size=65536k"]),
            Mount(destination: "/dev/pts", type: "devpts", source: "devpts",
                  options: ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] + (o.userNamespace ? [] : ["gid=5"])),
            Mount(destination: "/dev/shm", type: "tmpfs", source: "shm", options: ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
            Mount(destination: "/dev/mqueue", type: "mqueue", source: "mqueue", options: ["nosuid", "noexec", "nodev"]),
            Mount(destination: "/sys", type: "sysfs", source: "sysfs", options: ["nosuid", "noexec", "nodev", "ro"]),
            Mount(destination: "/sys/fs/cgroup", type: "cgroup", source: "cgroup", options: ["nosuid", "noexec", "nodev", "relatime", "ro"]),
            // The root is read-only; benchmarks and shells still need a scratch directory.
            Mount(destination: "/tmp", type: "tmpfs", source: "tmpfs", options: ["nosuid", "nodev", "mode=1777"]),
        ]
        for b in o.binds {
            mounts.append(Mount(destination: b.destination, type: "bind", source: b.source,
                                options: ["rbind", "nosuid", "nodev"] + (b.readOnly ? ["ro"] : ["rw"])))
        }
        var namespaces = ["pid", "ipc", "uts", "mount"].map { Namespace(type: $0) }
        namespaces.append(Namespace(type: "network", path: o.netnsPath))
        var uidMappings: [IDMapping]? = nil
        if o.userNamespace {
            namespaces.append(Namespace(type: "user"))
            uidMappings = [IDMapping(containerID: 0, hostID: 100_000, size: 65_536)]
        }
        let caps = defaultCapabilities
        return OCISpec(
            process: Process(
                terminal: false, user: User(uid: 0, gid: 0), args: o.command, env: o.env, cwd: o.cwd,
                capabilities: Capabilities(bounding: caps, effective: caps, inheritable: [], permitted: caps, ambient: []),
                rlimits: [RLimit(type: "RLIMIT_NOFILE", hard: openFilesLimit, soft: openFilesLimit)],
                noNewPrivileges: true),
            root: Root(path: o.rootfs, readonly: true),
            hostname: o.hostname,
            mounts: mounts,
            linux: Linux(
                uidMappings: uidMappings, gidMappings: uidMappings,
                resources: resources(for: o.enforcement),
                cgroupsPath: o.cgroupsPath,
                namespaces: namespaces,
                maskedPaths: defaultMaskedPaths, readonlyPaths: defaultReadonlyPaths,
                seccomp: defaultSeccomp))
    }

    /// The cgroup limits of an enforcement, from its one OCI rendering (`OCIResources`): weight
    /// → v1 shares (runtimes convert to v2 weight), the CPU cap as a quota over a 100 ms period,
    /// memory with equal swap (none), pids; devices denied.
    public static func resources(for enforcement: Enforcement?) -> Resources {
        var r = Resources(devices: [DeviceRule(allow: false, access: "rwm")], memory: nil, cpu: nil, pids: nil)
        guard let e = enforcement else { return r }
        let o = OCIResources(enforcement: e)
        if let limit = o.memory.limit, limit > 0 { r.memory = o.memory }
        r.cpu = o.cpu
        r.pids = o.pids
        return r
    }

    /// 65536 open files, or the caller's own hard limit when that is lower: raising a hard limit
    /// needs CAP_SYS_RESOURCE in the host's user namespace, which a sandboxed host may not grant.
    public static var openFilesLimit: UInt64 {
        var r = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &r) == 0 else { return 1024 }
        return min(65_536, UInt64(r.rlim_max))
    }
}
