/// mvm-vmm: one micro-VM per process. `mvm run --mode direct` starts it with the launch plan as a
/// config file; by hand it takes Firecracker's `--config-file` document, or waits for a whole
/// configuration over the Firecracker-compatible API on `--api-sock`. It links the VMM alone: no
/// libvirt, libguestfs, SQLite or container code.
///
///     mvm-vmm --api-sock /run/vm1.sock --id vm1
///     mvm-vmm --config-file vm1.json --console-log vm1.log --attached
///     mvm-vmm --config-file vm1.json --jail-uid 1836449793 --jail-gid 1836449793 --lifeline 3
///
/// Jailed (`--jail-uid/--jail-gid`), it builds the whole machine first, then enters the jail
/// (`Jail`) before any thread starts, and each thread confines itself to its kind's calls.
///
/// It links no Foundation, only FoundationEssentials (Data, and the encoder of its JSON answers;
/// it reads JSON with `JSONValue`): Foundation proper and its ICU data would triple the binary and
/// the memory each VMM costs (`mvm bench --scenarios vmm`).
import FoundationEssentials
import Synchronization
import Devices
import Jail
import KVM
import MicroVMCore
import VMM
import VMMAPI
#if canImport(Glibc)
import Glibc
#endif

struct Arguments {
    var configFile: String?
    var apiSocket: String?
    var id = "mvm-vmm-\(getpid())"
    var consoleLog: String?
    /// Die with the parent (`mvm run`, which holds the grant).
    var attached = false
    var devicePath = "/dev/kvm"
    /// Where to write, at exit, when the VM reached each milestone (CLOCK_MONOTONIC seconds,
    /// comparable with the launching process's clock).
    var timingsFile: String?
    /// The console log's size before it starts over (the previous one kept as FILE.1).
    var consoleLogMax = RotatingLog.defaultLimit
    /// Cgroup directories to join before the VM exists (the instance's slice).
    var cgroups: [String] = []
    /// The jail's uid and gid; nil: not jailed.
    var jail: (uid: UInt32, gid: UInt32)?
    var jailUID: UInt32?, jailGID: UInt32?
    /// A pipe's read end whose write end the parent holds: its hang-up ends this process.
    var lifeline: Int32?
    /// Jail, then make a forbidden call from a thread of this kind: the process must die of SIGSYS.
    var seccompCheck: VMMThreadKind?

    static let usage = """
        usage: mvm-vmm [--config-file FILE] [--api-sock PATH] [--id ID] [--console-log FILE [--console-log-max BYTES]] [--attached [--lifeline FD]] [--kvm-device PATH] [--timings-file FILE] [--cgroup DIR]... [--jail-uid UID --jail-gid GID] [--seccomp-check vcpu|device|api]
          --config-file FILE   a Firecracker configuration document: boot at once
          --api-sock PATH      serve the Firecracker-compatible API on this unix socket
          --id ID              the instance id GET / reports
          --console-log FILE   write the guest's serial console here (default: standard output)
          --console-log-max N  start the log over past N bytes, keeping the previous one as FILE.1
                               (default 8 MiB)
          --attached           end when the parent process ends
          --lifeline FD        ... as seen by the hang-up of this inherited pipe, whose write end
                               the parent holds (needed in a PID namespace of its own, where the
                               parent is out of sight)
          --timings-file FILE  at exit, write when the process started, the VM was created, its first
                               vCPU entered the guest and the guest's init reported ready (JSON,
                               CLOCK_MONOTONIC seconds)
          --cgroup DIR         join this cgroup (a directory holding cgroup.procs) before the VM is
                               created, so guest memory and vCPU time are charged there; repeat it
                               for each cgroup v1 hierarchy
          --jail-uid UID --jail-gid GID
                               once the machine is built, enter new mount, IPC and UTS namespaces,
                               pivot into an empty root, drop every capability, run as UID:GID and
                               confine each thread to its kind's system calls (seccomp); a call
                               outside them ends the VMM with SIGSYS and a line on stderr naming
                               it. Needs root and --config-file; the launcher makes the PID
                               namespace (mvm does)
          --seccomp-check KIND jail, then make a forbidden system call from a thread of KIND: the
                               process must die of SIGSYS (mvm doctor's check)
        One of --config-file and --api-sock is required. On a host whose KVM is emulated, guests boot
        only with MVM_DIRECT_ALLOW_EMULATED=1 (tiny test guests; Linux cannot boot there).
        """

    init(_ argv: [String]) throws {
        var it = argv.makeIterator()
        func value(_ flag: String) throws -> String {
            guard let v = it.next(), !v.hasPrefix("--") else { throw MicroVMError.invalidArgument("\(flag) needs a value") }
            return v
        }
        while let a = it.next() {
            switch a {
            case "--config-file": configFile = try value(a)
            case "--api-sock": apiSocket = try value(a)
            case "--id": id = try value(a)
            case "--console-log": consoleLog = try value(a)
            case "--console-log-max":
                let v = try value(a)
                guard let n = Int(v), n >= 4096 else { throw MicroVMError.invalidArgument("--console-log-max takes a size in bytes of at least 4096, not '\(v)'") }
                consoleLogMax = n
            case "--kvm-device": devicePath = try value(a)
            case "--timings-file": timingsFile = try value(a)
            case "--cgroup": cgroups.append(try value(a))
            case "--attached": attached = true
            case "--lifeline":
                let v = try value(a)
                guard let fd = Int32(v), fd > 2, fcntl(fd, F_GETFD) >= 0 else { throw MicroVMError.invalidArgument("--lifeline takes an open descriptor above 2, not '\(v)'") }
                lifeline = fd
            case "--jail-uid", "--jail-gid":
                let v = try value(a)
                guard let id = UInt32(v), id > 0, id < UInt32.max else { throw MicroVMError.invalidArgument("\(a) takes a non-zero numeric id, not '\(v)'") }
                if a == "--jail-uid" { jailUID = id } else { jailGID = id }
            case "--seccomp-check":
                let v = try value(a)
                guard let kind = VMMThreadKind(rawValue: v) else { throw MicroVMError.invalidArgument("--seccomp-check takes vcpu, device or api, not '\(v)'") }
                seccompCheck = kind
            case "-h", "--help": print(Self.usage); exit(0)
            default: throw MicroVMError.invalidArgument("unknown argument '\(a)'")
            }
        }
        switch (jailUID, jailGID) {
        case let (u?, g?): jail = (u, g)
        case (nil, nil): break
        default: throw MicroVMError.invalidArgument("give both --jail-uid and --jail-gid, or neither")
        }
        if seccompCheck != nil {
            guard jail != nil else { throw MicroVMError.invalidArgument("--seccomp-check needs --jail-uid and --jail-gid") }
            return
        }
        guard configFile != nil || apiSocket != nil else { throw MicroVMError.invalidArgument("give --config-file or --api-sock (or both)") }
        if jail != nil && configFile == nil {
            throw MicroVMError.invalidArgument("a jailed VMM needs --config-file: it opens every file it uses before it enters the jail, so a configuration made over the API alone cannot be jailed")
        }
    }
}

func fail(_ message: String, status: Int32) -> Never {
    writeStandardError("mvm-vmm: \(message)\n")
    exit(status)
}

/// What tells this process that the process that started it has ended: the lifeline pipe's
/// hang-up, else a pidfd of the parent (readable when it exits). Opened at once, watched by
/// `watchParent` (a thread, so after the jail when there is one). PR_SET_PDEATHSIG is not
/// used: it follows the parent *thread*, and the thread that spawned this one may end long
/// before the parent does.
func parentWatch(_ args: Arguments) -> (fd: Int32, parent: pid_t)? {
    guard args.attached else { return nil }
    let parent = getppid()
    if let fd = args.lifeline { return (fd, parent) }
    guard parent > 1 else { exit(1) }
    return (ChildProcess.pidfdOpen(parent), parent)
}

func watchParent(_ watch: (fd: Int32, parent: pid_t)) {
    let (fd, parent) = watch
    do {
        try NativeThread.detach(name: "parent-watch") {
            if fd >= 0 {
                var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                while poll(&p, 1, -1) < 0 && errno == EINTR {}
            } else {
                while getppid() == parent { usleep(200_000) }
            }
            writeStandardError("mvm-vmm: the process that started it ended; stopping\n")
            _exit(137)
        }
    } catch { fail("cannot watch the process that started it: \(error)", status: 1) }
}

/// CLOCK_MONOTONIC seconds when this process's code started.
let processStarted = Monotonic.seconds()

let args: Arguments
do { args = try Arguments(Array(CommandLine.arguments.dropFirst())) } catch {
    fail("\(error)\n\(Arguments.usage)", status: 2)
}
// SIGINT and SIGTERM are blocked before the first thread starts, so every thread inherits the
// block, and one thread takes them with sigwait (`startServices`). Blocked, they also reach the
// first process of a PID namespace, which ignores default-action signals otherwise.
var stopSignals = sigset_t()
sigemptyset(&stopSignals)
sigaddset(&stopSignals, SIGINT)
sigaddset(&stopSignals, SIGTERM)
pthread_sigmask(SIG_BLOCK, &stopSignals, nil)

// Into the slice's cgroups before anything sizable is allocated, and before the first thread
// starts: alone, this thread moves the whole process without the kernel's threadgroup lock.
if let failed = joinCgroups(args.cgroups) {
    fail("cannot join the cgroup \(failed.dir): \(String(cString: strerror(failed.errno)))", status: 2)
}

let parentFD = parentWatch(args)
if let parentFD, args.jail == nil { watchParent(parentFD) }

if let kind = args.seccompCheck, let jail = args.jail {
    do { try Jail.enter(Jail.Options(uid: jail.uid, gid: jail.gid, hostname: "seccomp-check")) } catch { fail("\(error)", status: 4) }
    do {
        try NativeThread.detach(name: "seccomp-check") {
            Jail.confine(kind)
            _ = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        }
    } catch { fail("\(error)", status: 1) }
    sleep(2)
    fail("the \(kind.rawValue) thread's filter let socket() through", status: 1)
}

var config = VMConfiguration()
if let file = args.configFile {
    guard let data = readWholeFile(file) else { fail("cannot read --config-file '\(file)': \(String(cString: strerror(errno)))", status: 2) }
    do { config = try VMConfiguration(parsing: data) } catch {
        fail("--config-file '\(file)' is not a Firecracker configuration: \(error)", status: 2)
    }
}

// The KVM verdict is cached per boot (mvm doctor and mvm share it): no probing here.
let kvm = KVMVerdictCache.verdict()
switch kvm.verdict {
case .hardware: break
case .absent: fail("no usable KVM: \(kvm.reason)", status: 3)
case .emulated where environmentVariable("MVM_DIRECT_ALLOW_EMULATED") == "1": break
case .emulated:
    fail("this host's KVM is emulated (\(kvm.reason)); a Linux guest cannot boot under it. Run in the nested rig (mvm rig run), or set MVM_DIRECT_ALLOW_EMULATED=1 for tiny test guests.", status: 3)
}

let console: OutputSink
if let path = args.consoleLog {
    do { console = try RotatingLog(path: path, limit: args.consoleLogMax).sink } catch {
        fail("cannot open --console-log '\(path)': \(error)", status: 2)
    }
} else {
    console = OutputSinks.standardOutput
}

/// This VMM's own version, as `GET /` reports it.
let vmmVersion = "0.3.0"

// Opened now: a jailed VMM has no path to it at exit.
let timingsFD: Int32 = args.timingsFile.map { open($0, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644) } ?? -1
if let file = args.timingsFile, timingsFD < 0 { fail("cannot open --timings-file '\(file)': \(String(cString: strerror(errno)))", status: 2) }

let exitStatus = Atomic<Int32>(0)
var options = VMMInstance.Options(id: args.id, devicePath: args.devicePath, console: console, onExit: { reason, registers in
    switch reason {
    case .powerOff, .reboot, .halted, .requested: exitStatus.store(0, ordering: .relaxed)
    default:
        writeStandardError("mvm-vmm: the VM stopped: \(reason)\(registers.map { "; " + $0 } ?? "")\n")
        exitStatus.store(1, ordering: .relaxed)
    }
})
// One VM per process: the code that built it is let go of once it runs.
options.dropsStartupPages = true
if let jail = args.jail {
    let jailOptions = Jail.Options(uid: jail.uid, gid: jail.gid, hostname: args.id)
    options.beforeThreads = { try Jail.enter(jailOptions) }
    options.onThread = { kind in Jail.confine(kind) }
}
let instance = VMMInstance(options: options)

// Bound now (the socket's path is the host's), served once the machine's threads may start.
func bindAPI(_ socket: String, jailed: Bool, config: VMConfiguration) -> APIServer {
    var confine: (@Sendable () -> Void)?
    if jailed { confine = { Jail.confine(.api) } }
    let router = APIRouter(controller: instance, instanceID: args.id, vmmVersion: vmmVersion, configuration: config)
    let s = APIServer(socketPath: socket, router: router, removesSocketFile: !jailed, onServeThread: confine)
    do { try s.listen() } catch { fail("cannot serve the API on '\(socket)': \(error)", status: 2) }
    return s
}
let server: APIServer? = args.apiSocket.map { bindAPI($0, jailed: args.jail != nil, config: config) }

/// The API, the parent's watch and the signals: threads, so after the jail when there is one.
/// SIGINT/SIGTERM stop the VM; the process then exits as it would after a power-off.
func startServices(server: APIServer?, parentFD: (fd: Int32, parent: pid_t)?, jailed: Bool, signals: sigset_t) {
    do { try server?.serve() } catch { fail("cannot serve the API: \(error)", status: 2) }
    if let parentFD, jailed { watchParent(parentFD) }
    do {
        try NativeThread.detach(name: "signals") {
            var set = signals
            while true {
                var sig: Int32 = 0
                guard sigwait(&set, &sig) == 0 else { continue }
                if instance.state == .notStarted { server?.stop(); exit(128 + sig) }
                instance.stop()
            }
        }
    } catch { fail("cannot wait for signals: \(error)", status: 1) }
}

if args.jail == nil { startServices(server: server, parentFD: parentFD, jailed: false, signals: stopSignals) }
if args.configFile != nil {
    do { try instance.start(config) } catch {
        server?.stop()
        fail("cannot start the VM: \(error)", status: 1)
    }
}
if args.jail != nil { startServices(server: server, parentFD: parentFD, jailed: true, signals: stopSignals) }
// Until the VM has started and stopped: the API may start it at any time (a signal before
// then ends the process at once).
_ = instance.waitForExit()
server?.stop()
if timingsFD >= 0 {
    var t = instance.milestones
    t["processStarted"] = processStarted
    if let data = try? JSONEncoder().encode(t) {
        _ = OutputSinks.writeAll([UInt8](data), to: timingsFD)
    }
    close(timingsFD)
}
exit(exitStatus.load(ordering: .relaxed))
