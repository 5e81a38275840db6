import CJail
import CKVM
import CVhost
import Glibc
import MicroVMCore

/// What each kind of VMM thread may ask of the kernel once jailed: the calls the Swift runtime
/// and the C library make on their own (memory, locks, signals, clocks, thread start and end),
/// then each kind's own. `ioctl` is allowed by request number, `clone` only for threads,
/// `prctl` only to name a thread or read its name; files cannot be opened (the root is empty anyway: opening
/// fails with EACCES rather than trapping, for a library that looks for a file it can do
/// without), and `clone3` fails with ENOSYS so the C library falls back to `clone`, whose flags
/// a filter can read. Everything else (execve, socket, ptrace, mount, kill of another process,
/// the file-changing calls) traps.
enum SeccompPolicy {
    struct Rule {
        enum Action { case allow, fail(Int32) }
        var name: String
        var action = Action.allow
        var argument: Int32?
        var mask: UInt64 = 0
        var value: UInt64 = 0

        static func allow(_ names: String...) -> [Rule] { names.map { Rule(name: $0) } }
        static func ioctl(_ requests: [UInt]) -> [Rule] { requests.map { Rule(name: "ioctl", argument: 1, value: UInt64($0)) } }
    }

    /// Every thread's: what runs under any Swift code.
    static let common: [Rule] =
        Rule.allow("read", "write", "readv", "writev", "close", "lseek", "fstat", "newfstatat", "statx",
                   "mmap", "munmap", "mprotect", "madvise", "mremap", "brk",
                   "futex", "sched_yield", "rseq", "set_robust_list", "membarrier", "getcpu",
                   "rt_sigreturn", "rt_sigprocmask", "rt_sigaction", "sigaltstack", "rt_sigtimedwait", "restart_syscall",
                   "getpid", "gettid", "tgkill", "exit", "exit_group",
                   "clock_gettime", "clock_getres", "gettimeofday", "clock_nanosleep", "nanosleep",
                   "poll", "ppoll", "epoll_wait", "epoll_pwait", "epoll_ctl", "fcntl",
                   "getrandom", "sched_getaffinity", "getuid", "geteuid", "getgid", "getegid",
                   // A thread narrows its own filter (a filter can only be added, never loosened).
                   "seccomp",
                   // Dispatch's worker threads set their own nice value for their QoS class.
                   "setpriority", "getpriority")
        // A thread, never a process: CLONE_THREAD must be set.
        + [Rule(name: "clone", argument: 0, mask: UInt64(CJAIL_CLONE_THREAD), value: UInt64(CJAIL_CLONE_THREAD)),
           Rule(name: "clone3", action: .fail(ENOSYS)),
           Rule(name: "prctl", argument: 0, value: UInt64(CJAIL_PR_SET_NAME)),
           Rule(name: "prctl", argument: 0, value: UInt64(CJAIL_PR_GET_NAME)),
           Rule(name: "openat", action: .fail(EACCES)), Rule(name: "open", action: .fail(EACCES))]
        // isatty(3) on a standard stream: a terminal's attributes, read only.
        + Rule.ioctl([UInt(TCGETS)])

    /// The ioctls of a running machine's vCPU: KVM_RUN and what its exits lead to (interrupt
    /// lines, a register dump when the guest fails), and what a driver's DRIVER_OK sets up
    /// (vhost rings, tap offloads).
    static let vcpuIoctls: [UInt] = [CKVM_RUN, CKVM_IRQ_LINE, CKVM_IRQFD, CKVM_IOEVENTFD,
                                     CKVM_GET_REGS, CKVM_GET_SREGS, CKVM_GET_VCPU_EVENTS, CKVM_GET_MP_STATE, CKVM_GET_LAPIC]
        + vhostIoctls + [TapDevice.TUNSETOFFLOAD]
    static let vhostIoctls: [UInt] = [CVHOST_GET_FEATURES, CVHOST_SET_FEATURES, CVHOST_SET_MEM_TABLE, CVHOST_SET_VRING_NUM,
                                      CVHOST_SET_VRING_ADDR, CVHOST_SET_VRING_BASE, CVHOST_GET_VRING_BASE, CVHOST_SET_VRING_KICK,
                                      CVHOST_SET_VRING_CALL, CVHOST_VSOCK_SET_RUNNING, CVHOST_RESET_OWNER]

    static func rules(for kind: VMMThreadKind) -> [Rule] {
        switch kind {
        case .vcpu:
            // The console log starts over in place (RotatingLog): copy, then truncate.
            common + Rule.ioctl(vcpuIoctls) + Rule.allow("eventfd2", "ftruncate", "pread64", "pwrite64")
        case .device:
            // Disk and tap I/O, discard and flush, and an interrupt pulse where there is no irqfd.
            common + Rule.ioctl([CKVM_IRQ_LINE])
                + Rule.allow("pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2", "fsync", "fdatasync", "fallocate")
        case .api:
            // The socket's connections; Ctrl-Alt-Del raises the keyboard's interrupt line.
            common + Rule.ioctl([CKVM_IRQ_LINE])
                + Rule.allow("accept4", "accept", "recvfrom", "recvmsg", "sendto", "sendmsg", "shutdown", "getsockopt", "pwrite64", "ftruncate",
                             // A new interval for the balloon's statistics (PATCH /balloon/statistics).
                             "timerfd_settime")
        }
    }

    /// The whole process's filter: every kind's calls, and what the remaining threads need
    /// (starting the machine's threads, the signal sources, the end of the run: the timings
    /// file, devices torn down).
    static var process: [Rule] {
        var seen = Set<String>()
        var rules: [Rule] = []
        let extra = Rule.allow("sched_setaffinity", "eventfd2", "epoll_create1", "signalfd4", "timerfd_create", "timerfd_settime", "pipe2", "dup", "dup3")
            + Rule.ioctl([CKVM_IOEVENTFD, CKVM_IRQFD])
        for rule in VMMThreadKind.allCases.flatMap(rules(for:)) + extra {
            let key = "\(rule.name)/\(rule.argument ?? -1)/\(rule.value)/\(rule.mask)"
            if seen.insert(key).inserted { rules.append(rule) }
        }
        return rules
    }
}
