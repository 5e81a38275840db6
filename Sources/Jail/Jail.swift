import CJail
import CKVM
import CVhost
import Glibc
import MicroVMCore

/// The VMM's jail, after Firecracker's jailer. Once the machine is built (its `/dev/kvm`
/// descriptors, guest memory, taps, disks and console log open, the kernel loaded) and before
/// any of its threads starts, the VMM:
///
/// 1. enters new mount, IPC and UTS namespaces (the PID namespace is its launcher's to make:
///    the VMM is its first process, pid 1);
/// 2. pivots into an empty, read-only root of its own (a tmpfs that ends with the VMM), so no
///    host path exists for it;
/// 3. drops every capability, bounding set included, takes an unprivileged uid and gid with no
///    supplementary groups, and sets `no_new_privs`;
/// 4. loads a seccomp allow-list for the whole process, then each thread narrows it to its kind
///    (`confine`) as it starts. A system call outside the list traps: the VMM writes which call,
///    from which kind of thread, to its stderr and dies of SIGSYS.
///
/// ```swift
/// try Jail.enter(Jail.Options(uid: 1_836_449_792, gid: 1_836_449_792, hostname: "vm1"))
/// // on each thread the VMM starts:
/// Jail.confine(.vcpu)
/// ```
///
/// Namespaces and the root are per thread in Linux, so `enter` refuses to run once a second
/// thread exists: everything before it must be single-threaded.
public enum Jail {
    public struct Options: Sendable {
        public var uid: uid_t
        public var gid: gid_t
        public var hostname: String

        public init(uid: uid_t, gid: gid_t, hostname: String) {
            self.uid = uid; self.gid = gid; self.hostname = hostname
        }
    }

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
        init(_ what: String, errno e: Int32) {
            let hint = e == EPERM ? "; the jail needs root (CAP_SYS_ADMIN, CAP_SETUID, CAP_SETGID), or pass --no-jail" : ""
            description = "cannot jail the VMM: \(what): \(String(cString: strerror(e)))\(hint)"
        }
        init(_ message: String) { description = "cannot jail the VMM: \(message)" }
    }

    /// The first uid (and gid) of the range jailed VMMs take, one per instance name
    /// (`Jail.uid(for:)`): ids no account on the host has.
    public static let idBase: UInt32 = 0x6d76_0000

    /// An instance's uid and gid in the jail: the same for a name every time, different for
    /// most pairs of names (a shared id would still leave each VMM in its own PID namespace,
    /// with no file and no process of another in sight).
    public static func uid(for name: String) -> UInt32 {
        var h: UInt32 = 2_166_136_261  // FNV-1a
        for b in name.utf8 { h = (h ^ UInt32(b)) &* 16_777_619 }
        return idBase + (h & 0xffff)
    }

    /// Enters the jail. Throws, naming the step, when the host or the caller cannot; nothing
    /// is half-done that matters then: the VMM exits.
    public static func enter(_ o: Options) throws(Failure) {
        // A thread that has just ended (the KVM probe's, when the verdict was not cached yet)
        // may still be listed for a moment.
        var threads = NativeThread.count()
        for _ in 0..<100 where threads > 1 {
            usleep(2_000)
            threads = NativeThread.count()
        }
        guard threads == 1 else {
            throw Failure("\(threads) threads are running; namespaces and the root change per thread, so the VMM must enter the jail before it starts any")
        }
        let unshared = cjail_unshare_mount_ipc_uts()
        guard unshared == 0 else { throw Failure("unshare(mount, IPC, UTS namespaces)", errno: -unshared) }
        // Nothing of ours propagates back to the host, and nothing of the host's reaches us.
        guard mount(nil, "/", nil, UInt(MS_REC | MS_PRIVATE), nil) == 0 else { throw Failure("making the mounts private", errno: errno) }
        // An empty tmpfs becomes the root: mounted on /tmp in this namespace only.
        guard mount("mvm-jail", "/tmp", "tmpfs", UInt(MS_NOSUID | MS_NODEV | MS_NOEXEC), "size=4k,nr_inodes=4,mode=0555") == 0 else {
            throw Failure("mounting the jail's root", errno: errno)
        }
        guard chdir("/tmp") == 0 else { throw Failure("chdir to the jail's root", errno: errno) }
        // pivot_root(".", "."): the old root is stacked under the new one, then detached.
        let pivoted = cjail_pivot_root(".", ".")
        guard pivoted == 0 else { throw Failure("pivot_root", errno: -pivoted) }
        guard umount2(".", Int32(MNT_DETACH)) == 0 else { throw Failure("detaching the host's root", errno: errno) }
        guard chdir("/") == 0 else { throw Failure("chdir /", errno: errno) }
        guard mount(nil, "/", nil, UInt(MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC), nil) == 0 else {
            throw Failure("making the jail's root read-only", errno: errno)
        }
        let host = String(o.hostname.utf8.prefix(64)) ?? "mvm-vmm"
        guard sethostname(host, host.utf8.count) == 0 else { throw Failure("sethostname", errno: errno) }

        let dropped = cjail_drop_capability_bounds()
        guard dropped == 0 else { throw Failure("dropping the capability bounding set", errno: -dropped) }
        guard setgroups(0, nil) == 0 else { throw Failure("setgroups", errno: errno) }
        let gid = cjail_setresgid(o.gid)
        guard gid == 0 else { throw Failure("setresgid \(o.gid)", errno: -gid) }
        let uid = cjail_setresuid(o.uid)
        guard uid == 0 else { throw Failure("setresuid \(o.uid)", errno: -uid) }
        // Leaving uid 0 clears the permitted and effective sets; check rather than trust.
        guard cjail_has_capabilities() == 0 else { throw Failure("capabilities remain after leaving uid 0") }
        let nnp = cjail_set_no_new_privs()
        guard nnp == 0 else { throw Failure("no_new_privs", errno: -nnp) }

        let reporter = cjail_install_reporter()
        guard reporter == 0 else { throw Failure("installing the SIGSYS reporter", errno: -reporter) }
        try load(SeccompPolicy.process, kind: nil)
    }

    /// Narrows the calling thread to its kind's system calls. A thread that cannot be confined
    /// ends the VMM: running it unconfined would be worse.
    public static func confine(_ kind: VMMThreadKind) {
        do { try load(SeccompPolicy.rules(for: kind), kind: kind) } catch {
            let text = "mvm-vmm: \(error)\n"
            _ = text.withCString { write(2, $0, strlen($0)) }
            _exit(70)
        }
    }

    /// Whether this process may jail a VMM: nil when it can, else why not.
    public static func unavailableReason() -> String? {
        if geteuid() != 0 { return "the jail needs root (to make namespaces and change to the VMM's uid); run mvm as root, or pass --no-jail" }
        if cjail_syscall_number("seccomp") < 0 { return "libseccomp does not know this architecture's system calls" }
        return nil
    }

    static func load(_ rules: [SeccompPolicy.Rule], kind: VMMThreadKind?) throws(Failure) {
        guard let filter = cjail_filter_new() else { throw Failure("libseccomp could not make a filter") }
        defer { cjail_filter_release(filter) }
        for rule in rules {
            let rc: Int32
            switch rule.action {
            case .allow: rc = cjail_filter_allow(filter, rule.name, rule.argument ?? -1, rule.mask, rule.value)
            case .fail(let e): rc = cjail_filter_fail(filter, rule.name, e)
            }
            // A call this kernel's table does not know cannot be made either: skip it.
            guard rc == 0 || rc == -ENOENT else { throw Failure("adding \(rule.name) to the \(kind?.rawValue ?? "process") filter", errno: -rc) }
        }
        let loaded = cjail_filter_load(filter)
        guard loaded == 0 else { throw Failure("loading the \(kind?.rawValue ?? "process") seccomp filter", errno: -loaded) }
        if let kind { cjail_set_thread_kind(Int32(VMMThreadKind.allCases.firstIndex(of: kind)!)) }
    }
}
