/// mvm-vmm: one micro-VM per process. `mvm run --mode direct` starts it with the launch plan as a
/// config file; by hand it takes Firecracker's `--config-file` document, or waits for a whole
/// configuration over the Firecracker-compatible API on `--api-sock`. It links the VMM alone: no
/// libvirt, libguestfs, SQLite or container code.
///
///     mvm-vmm --api-sock /run/vm1.sock --id vm1
///     mvm-vmm --config-file vm1.json --console-log vm1.log --attached
import Foundation
import Synchronization
import Devices
import Host
import MicroVMCore
import VMM
import VMMAPI

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

    static let usage = """
        usage: mvm-vmm [--config-file FILE] [--api-sock PATH] [--id ID] [--console-log FILE [--console-log-max BYTES]] [--attached] [--kvm-device PATH] [--timings-file FILE] [--cgroup DIR]...
          --config-file FILE   a Firecracker configuration document: boot at once
          --api-sock PATH      serve the Firecracker-compatible API on this unix socket
          --id ID              the instance id GET / reports
          --console-log FILE   write the guest's serial console here (default: standard output)
          --console-log-max N  start the log over past N bytes, keeping the previous one as FILE.1
                               (default 8 MiB)
          --attached           end when the parent process ends
          --timings-file FILE  at exit, write when the process started, the VM was created, its first
                               vCPU entered the guest and the guest's init reported ready (JSON,
                               CLOCK_MONOTONIC seconds)
          --cgroup DIR         join this cgroup (a directory holding cgroup.procs) before the VM is
                               created, so guest memory and vCPU time are charged there; repeat it
                               for each cgroup v1 hierarchy
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
            case "-h", "--help": print(Self.usage); exit(0)
            default: throw MicroVMError.invalidArgument("unknown argument '\(a)'")
            }
        }
        guard configFile != nil || apiSocket != nil else { throw MicroVMError.invalidArgument("give --config-file or --api-sock (or both)") }
    }
}

func fail(_ message: String, status: Int32) -> Never {
    FileHandle.standardError.write(Data("mvm-vmm: \(message)\n".utf8))
    exit(status)
}

/// Ends this process when the process that started it ends. PR_SET_PDEATHSIG follows the
/// parent *thread*, and a pool thread of the parent may end long before the parent does, so the
/// parent process is watched instead: a pidfd of it becomes readable when it exits (polling
/// getppid where pidfds are missing).
func dieWithParent() {
    let parent = getppid()
    guard parent > 1 else { exit(1) }
    let pidfd = ChildProcess.pidfdOpen?(parent, 0) ?? -1
    let watcher = Thread {
        if pidfd >= 0 {
            var p = pollfd(fd: pidfd, events: Int16(POLLIN), revents: 0)
            while poll(&p, 1, -1) < 0 && errno == EINTR {}
        } else {
            while getppid() == parent { usleep(200_000) }
        }
        FileHandle.standardError.write(Data("mvm-vmm: the process that started it (pid \(parent)) ended; stopping\n".utf8))
        _exit(137)
    }
    watcher.name = "parent-watch"
    watcher.start()
    if getppid() != parent { exit(1) }
}

/// CLOCK_MONOTONIC seconds when this process's code started.
let processStarted = Monotonic.seconds()

let args: Arguments
do { args = try Arguments(Array(CommandLine.arguments.dropFirst())) } catch {
    fail("\(error)\n\(Arguments.usage)", status: 2)
}
if args.attached { dieWithParent() }
// Into the slice's cgroups before anything sizable is allocated: writing 0 moves this process.
for dir in args.cgroups {
    let fd = open(dir + "/cgroup.procs", O_WRONLY | O_CLOEXEC)
    guard fd >= 0, write(fd, "0", 1) == 1 else { fail("cannot join the cgroup \(dir): \(String(cString: strerror(errno)))", status: 2) }
    close(fd)
}

var config = VMConfiguration()
if let file = args.configFile {
    guard let data = FileManager.default.contents(atPath: file) else { fail("cannot read --config-file '\(file)'", status: 2) }
    do { config = try JSONDecoder().decode(VMConfiguration.self, from: data) } catch {
        fail("--config-file '\(file)' is not a Firecracker configuration: \(error)", status: 2)
    }
}

// The KVM verdict is cached per boot (mvm doctor and mvm share it): no probing here.
let kvm = HostProfile.kvm()
switch kvm.verdict {
case .hardware: break
case .absent: fail("no usable KVM: \(kvm.reason)", status: 3)
case .emulated where ProcessInfo.processInfo.environment["MVM_DIRECT_ALLOW_EMULATED"] == "1": break
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

let exitStatus = Atomic<Int32>(0)
let instance = VMMInstance(options: VMMInstance.Options(id: args.id, devicePath: args.devicePath, console: console) { reason in
    switch reason {
    case .powerOff, .reboot, .halted, .requested: exitStatus.store(0, ordering: .relaxed)
    default:
        FileHandle.standardError.write(Data("mvm-vmm: the VM stopped: \(reason)\n".utf8))
        exitStatus.store(1, ordering: .relaxed)
    }
})

var server: APIServer?
if let socket = args.apiSocket {
    do {
        let router = APIRouter(controller: instance, instanceID: args.id, vmmVersion: vmmVersion, configuration: config)
        let s = APIServer(socketPath: socket, router: router)
        try s.start()
        server = s
    } catch { fail("cannot serve the API on '\(socket)': \(error)", status: 2) }
}

// SIGINT/SIGTERM stop the VM; the process then exits as it would after a power-off.
let signals = [SIGINT, SIGTERM].map { sig -> any DispatchSourceSignal in
    signal(sig, SIG_IGN)
    let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
    s.setEventHandler {
        if instance.state == .notStarted { server?.stop(); exit(128 + sig) }
        instance.stop()
    }
    s.resume()
    return s
}

if args.configFile != nil {
    do { try instance.start(config) } catch {
        server?.stop()
        fail("cannot start the VM: \(error)", status: 1)
    }
}
// Until the VM has started and stopped: the API may start it at any time (a signal before
// then ends the process at once).
_ = instance.waitForExit()
server?.stop()
if let file = args.timingsFile {
    var t = instance.milestones
    t["processStarted"] = processStarted
    if let data = try? JSONEncoder().encode(t) { try? Paths.writeScratch(data, to: file, atomically: true) }
}
exit(exitStatus.load(ordering: .relaxed))
