import Foundation
import MicroVMCore
import Containers
#if canImport(Glibc)
import Glibc
#endif

/// Every scenario `mvm bench` knows, in report order.
public enum Scenarios {
    public static let all: [any BenchScenario] = [StartLatency(), MemoryOverhead(), CPUThroughput(), MemoryBandwidth(),
                                                 SyscallLatency(), DiskIO(), NetworkThroughput(), NoisyNeighbour(), MemoryReclaim(), VMMScenario(),
                                                 ContainerdScenario()]
    public static var names: [String] { all.map(\.name) }

    public static func named(_ names: [String]) throws -> [any BenchScenario] {
        try names.map { n in
            guard let s = all.first(where: { $0.name == n }) else {
                throw MicroVMError.invalidArgument("unknown scenario '\(n)': choose from \(Self.names.joined(separator: ", "))")
            }
            return s
        }
    }
}

/// Launch to boot-complete (VMs) or to the first instruction (containers, native), serially and
/// several at once.
public struct StartLatency: BenchScenario {
    public var tools: [String] { ["true"] }
    public let name = "start"
    public static let serial = Metric("start-serial", "Start latency (serial launches)", unit: "ms", higherIsBetter: false)
    public init() {}
    public func metrics(for ctx: BenchContext) -> [Metric] { [Self.serial, Self.parallel(ctx.durations.parallelLaunches)] }
    public var note: String? { "one interval for every backend, on CLOCK_MONOTONIC: from the launch request (before validation and the grant) to ready — a VM init's boot-complete, a container command's first instruction, a native process's spawn; each sample's phases are in its details" }
    static func parallel(_ k: Int) -> Metric { Metric("start-parallel-\(k)", "Start latency (\(k) launched at once)", unit: "ms", higherIsBetter: false) }
    public func runsPerMeasure(_ ctx: BenchContext) -> Int { ctx.serialStartsOnly ? 1 : 1 + ctx.durations.parallelLaunches }

    /// Request → ready, or an error: a run that never reached ready has no start figure, and no
    /// other interval stands in for it.
    static func start(_ r: RunResult, _ metric: Metric) throws -> Measurement {
        guard let phases = r.phases, let ready = phases.start else {
            throw MicroVMError(.backend, "the instance never reported ready (phases: \(r.phases?.summary ?? "none")): no start figure")
        }
        return Measurement(metric, ready * 1000, details: phases.details)
    }

    public func measure(_ target: BenchTarget, _ ctx: BenchContext) async throws -> [Measurement] {
        var out: [Measurement] = []
        let one = try await ctx.run(target, ["true"], tag: "start")
        _ = try requireSuccess(one, "true")
        out.append(try Self.start(one, Self.serial))
        let k = ctx.durations.parallelLaunches
        if ctx.serialStartsOnly {
            out.append(.unavailable(Self.parallel(k), "not measured in --quick for emulated VMs (each boot costs many seconds); run --full"))
            return out
        }
        let results = try await withThrowingTaskGroup(of: RunResult.self) { group in
            for _ in 0..<k { group.addTask { try await ctx.run(target, ["true"], tag: "pstart") } }
            var rs: [RunResult] = []
            for try await r in group { rs.append(r) }
            return rs
        }
        for r in results {
            _ = try requireSuccess(r, "true")
            out.append(try Self.start(r, Self.parallel(k)))
        }
        return out
    }
}

/// Host memory per idle instance: PSS of the instance's host processes, sampled while it idles.
public struct MemoryOverhead: BenchScenario {
    public var tools: [String] { ["sleep"] }
    public let name = "memory-overhead"
    public init() {}
    static func metric(_ k: Int) -> Metric { Metric("pss-per-instance-\(k)", "Host PSS per idle instance (\(k) running)", unit: "MiB", higherIsBetter: false) }
    public func metrics(for ctx: BenchContext) -> [Metric] { [Self.metric(1), Self.metric(ctx.durations.idleInstances)] }
    public var note: String? { "peak PSS (/proc/PID/smaps_rollup) of the host processes found for the instances (backend pids, command lines naming the instance, and their descendants), divided by the count; a VM's guest RAM counts only where touched; a direct VM is its mvm-vmm process" }
    public func runsPerMeasure(_ ctx: BenchContext) -> Int { 1 + ctx.durations.idleInstances }

    public func measure(_ target: BenchTarget, _ ctx: BenchContext) async throws -> [Measurement] {
        guard let backend = target.backend else { throw ScenarioUnavailable(target.record.unavailableReason ?? "unavailable") }
        var out: [Measurement] = []
        for k in Array(Set([1, ctx.durations.idleInstances])).sorted() {
            let names = (0..<k).map { _ in "bench-idle-\(UUID().uuidString.prefix(6).lowercased())" }
            let sampler = PSSSampler(names: names, backend: backend)
            let idle = ["sleep", "3"]
            let task = Task { await sampler.run() }
            let results = try await withThrowingTaskGroup(of: RunResult.self) { group in
                for n in names {
                    group.addTask { try await ctx.run(backend, target: target, name: n, command: idle) }
                }
                var rs: [RunResult] = []
                for try await r in group { rs.append(r) }
                return rs
            }
            await sampler.stop()
            let peak = await task.value
            for r in results { _ = try requireSuccess(r, "sleep") }
            guard peak.bytes > 0 else {
                throw ScenarioUnavailable("no host process of the instances could be found to measure")
            }
            out.append(Measurement(Self.metric(k), Double(peak.bytes) / Double(k) / 1_048_576,
                                   details: ["processes": peak.processes.joined(separator: ","), "instances": "\(k)"]))
        }
        return out
    }
}

/// Polls the instances' processes and keeps the peak of their summed PSS.
actor PSSSampler {
    let names: [String]
    let backend: any InstanceBackend
    var stopped = false
    init(names: [String], backend: any InstanceBackend) { self.names = names; self.backend = backend }
    func stop() { stopped = true }

    func run() async -> (bytes: UInt64, processes: [String]) {
        var best: UInt64 = 0, bestNames: [String] = []
        while !stopped {
            let listed = (try? await backend.list()) ?? []
            let table = ProcessMemory.table()
            var total: UInt64 = 0, comms: [String] = []
            var counted = Set<Int32>()
            for n in names {
                let pids = listed.filter { $0.name == n }.compactMap(\.pid)
                for e in ProcessMemory.instanceProcesses(name: n, pids: pids, table: table) where counted.insert(e.pid).inserted {
                    total += ProcessMemory.pss(pid: e.pid) ?? 0
                    comms.append(e.comm)
                }
            }
            if total > best { best = total; bestNames = Array(Set(comms)).sorted() }
            try? await Task.sleep(nanoseconds: 250_000_000)
        }
        return (best, bestNames)
    }
}

/// sysbench cpu: prime-number events per second on one thread.
public struct CPUThroughput: BenchScenario {
    public var tools: [String] { ["sysbench"] }
    public let name = "cpu"
    public static let metric = Metric("sysbench-cpu", "CPU throughput (sysbench cpu, 1 thread)", unit: "events/s", higherIsBetter: true)
    public init() {}
    public func metrics(for ctx: BenchContext) -> [Metric] { [Self.metric] }
    public func measure(_ target: BenchTarget, _ ctx: BenchContext) async throws -> [Measurement] {
        let r = try await ctx.run(target, ["sysbench", "cpu", "--threads=1", "--time=\(Int(ctx.durations.cpuSeconds))", "run"], tag: "cpu")
        let text = try requireSuccess(r, "sysbench cpu")
        guard let v = ToolParsers.sysbenchEventsPerSecond(text) else { throw MicroVMError(.backend, "sysbench cpu printed no 'events per second': \(text.suffix(300))") }
        return [Measurement(Self.metric, v)]
    }
}

/// sysbench memory: sequential 1 KiB-block writes, MiB/s.
public struct MemoryBandwidth: BenchScenario {
    public var tools: [String] { ["sysbench"] }
    public let name = "memory"
    public static let metric = Metric("sysbench-memory", "Memory bandwidth (sysbench memory, 1K writes)", unit: "MiB/s", higherIsBetter: true)
    public init() {}
    public func metrics(for ctx: BenchContext) -> [Metric] { [Self.metric] }
    public func measure(_ target: BenchTarget, _ ctx: BenchContext) async throws -> [Measurement] {
        let r = try await ctx.run(target, ["sysbench", "memory", "--threads=1", "--memory-total-size=100T", "--time=\(Int(ctx.durations.memorySeconds))", "run"], tag: "mem")
        let text = try requireSuccess(r, "sysbench memory")
        guard let v = ToolParsers.sysbenchMiBPerSecond(text) else { throw MicroVMError(.backend, "sysbench memory printed no MiB/sec: \(text.suffix(300))") }
        return [Measurement(Self.metric, v)]
    }
}

/// A tight syscall loop: sysbench's threads test with one thread is sched_yield() after
/// sched_yield() (its mutexes are uncontended, so they stay in user space).
public struct SyscallLatency: BenchScenario {
    public var tools: [String] { ["sysbench"] }
    public let name = "syscall"
    public static let metric = Metric("syscall-sched-yield", "Syscall latency (sched_yield loop, sysbench threads)", unit: "ns/syscall", higherIsBetter: false)
    static let yields = 1000
    public init() {}
    public func metrics(for ctx: BenchContext) -> [Metric] { [Self.metric] }
    public var note: String? { "sysbench threads --threads=1 --thread-yields=1000: total time / (events × 1000); sched_yield, not getppid" }
    public func measure(_ target: BenchTarget, _ ctx: BenchContext) async throws -> [Measurement] {
        let r = try await ctx.run(target, ["sysbench", "threads", "--threads=1", "--thread-yields=\(Self.yields)", "--thread-locks=1",
                                           "--time=\(Int(ctx.durations.syscallSeconds))", "run"], tag: "sys")
        let text = try requireSuccess(r, "sysbench threads")
        guard let t = ToolParsers.sysbenchTotals(text), t.events > 0 else {
            throw MicroVMError(.backend, "sysbench threads printed no totals: \(text.suffix(300))")
        }
        return [Measurement(Self.metric, t.seconds * 1e9 / (t.events * Double(Self.yields)))]
    }
}

/// fio 4 KiB random writes then reads. VMs get a scratch raw disk of their own (a sparse file on
/// the host, attached as the second virtio disk, /dev/vdb) so the numbers measure the VMM's
/// block path; containers and native runs use a file in their own /tmp. O_DIRECT wherever the
/// target takes it (a container's /tmp is a tmpfs, which refuses it: then buffered, labelled).
public struct DiskIO: BenchScenario {
    public var tools: [String] { ["sh", "fio"] }
    public let name = "disk"
    public static let write = Metric("fio-randwrite", "Disk 4K random write (fio, psync, QD1)", unit: "IOPS", higherIsBetter: true)
    public static let read = Metric("fio-randread", "Disk 4K random read (fio, psync, QD1)", unit: "IOPS", higherIsBetter: true)
    public static let sequential = Metric("fio-seqread-bw", "Disk 128K sequential read (fio, psync, QD1)", unit: "MiB/s", higherIsBetter: true)
    public init() {}
    public func metrics(for ctx: BenchContext) -> [Metric] { [Self.write, Self.read, Self.sequential] }
    public var note: String? { "VMs: a scratch raw file on the host's disk as /dev/vdb (virtio-blk); containers: a scratch directory on the host's disk bind-mounted at /mnt; native: a file in the image tree on the host's disk; direct=1 unless the target refuses O_DIRECT (then details say buffered)" }

    /// Where the target lies: a file in the instance's /tmp (native), the guest's virtio disk that
    /// is not mounted (VMs: the rootfs is /dev/vda, mounted on /; never on a host, whose own
    /// disks may be /dev/vd*), or a file in the bind-mounted scratch directory (containers).
    enum Target { case temporaryFile, scratchDisk, scratchDirectory }

    static func script(seconds: Int, size: ByteCount, target: Target) -> String {
        let common = "--name=mvmbench --filename=$f --size=\(size.mebibytes)M --bs=4k --ioengine=psync --runtime=\(seconds) --time_based --output-format=json"
        let pick: String
        switch target {
        case .temporaryFile: pick = ""
        case .scratchDisk:
            pick = "for v in /dev/vda /dev/vdb /dev/vdc; do [ -b $v ] && ! grep -q \"^$v \" /proc/mounts && { f=$v; break; }; done; [ -b \"$f\" ] || { echo 'no scratch disk in the guest'; exit 1; }"
        case .scratchDirectory: pick = "f=\(ContainerBackend.diskMountPoint)/mvm-bench.fio"
        }
        return """
        d=1; f=/tmp/mvm-bench.fio; \(pick)
        fio \(common) --rw=randwrite --direct=1 > /tmp/mvm-fio-w 2>&1 || { d=0; fio \(common) --rw=randwrite --direct=0 > /tmp/mvm-fio-w 2>&1; }
        s=$?; echo @@write; cat /tmp/mvm-fio-w
        fio \(common) --rw=randread --direct=$d > /tmp/mvm-fio-r 2>&1; t=$?; echo @@read; cat /tmp/mvm-fio-r
        fio \(common.replacingOccurrences(of: "--bs=4k", with: "--bs=128k")) --rw=read --direct=$d > /tmp/mvm-fio-q 2>&1; u=$?; echo @@seq; cat /tmp/mvm-fio-q
        [ -b "$f" ] || rm -f "$f"; rm -f /tmp/mvm-fio-w /tmp/mvm-fio-r /tmp/mvm-fio-q; echo direct=$d; echo target=$f
        [ $s -eq 0 ] && [ $t -eq 0 ] && [ $u -eq 0 ]
        """
    }

    public func measure(_ target: BenchTarget, _ ctx: BenchContext) async throws -> [Measurement] {
        var disks: [DiskSpec] = []
        var scratch: String?
        var where_ = Target.temporaryFile
        let tag = UUID().uuidString.prefix(8)
        if target.record.mode.isVM {
            let path = NSTemporaryDirectory() + "mvm-bench-disk-\(tag).img"
            guard FileManager.default.createFile(atPath: path, contents: nil), truncate(path, off_t(ctx.durations.fioSize.bytes + (16 << 20))) == 0 else {
                throw MicroVMError(.backend, "cannot create the scratch disk \(path): \(String(cString: strerror(errno)))")
            }
            scratch = path
            where_ = .scratchDisk
        } else if target.record.mode == .container {
            let path = NSTemporaryDirectory() + "mvm-bench-dir-\(tag)"
            guard mkdir(path, 0o777) == 0, chmod(path, 0o777) == 0 else {
                throw MicroVMError(.backend, "cannot create the scratch directory \(path): \(String(cString: strerror(errno)))")
            }
            scratch = path
            where_ = .scratchDirectory
        }
        if let scratch { disks = [DiskSpec(path: scratch)] }
        defer { if let scratch { try? FileManager.default.removeItem(atPath: scratch) } }
        let r = try await ctx.run(target, ["sh", "-c", Self.script(seconds: Int(ctx.durations.fioSeconds), size: ctx.durations.fioSize, target: where_)], tag: "fio", disks: disks)
        let text = try requireSuccess(r, "fio")
        guard let w = text.range(of: "@@write"), let rd = text.range(of: "@@read"), let sq = text.range(of: "@@seq"),
              w.upperBound <= rd.lowerBound, rd.upperBound <= sq.lowerBound else {
            throw MicroVMError(.backend, "fio output lacks its markers: \(text.suffix(300))")
        }
        let kv = ToolParsers.keyValues(String(text[sq.upperBound...]))
        let details = ["io": kv["direct"] == "1" ? "O_DIRECT" : "buffered", "target": kv["target"] ?? "?"]
        guard let wi = ToolParsers.fioIOPS(String(text[w.upperBound..<rd.lowerBound]), write: true),
              let ri = ToolParsers.fioIOPS(String(text[rd.upperBound..<sq.lowerBound]), write: false),
              let bw = ToolParsers.fioBandwidth(String(text[sq.upperBound...]), write: false) else {
            throw MicroVMError(.backend, "fio printed no IOPS or bandwidth: \(text.suffix(300))")
        }
        return [Measurement(Self.write, wi, details: details), Measurement(Self.read, ri, details: details),
                Measurement(Self.sequential, bw / 1_048_576, details: details)]
    }
}

/// iperf3 between the instance and a server on the host, both ways (instance→host exercises a
/// VM's transmit path, host→instance its receive path), and the round-trip time of pings to the
/// host, all in one instance run.
public struct NetworkThroughput: BenchScenario {
    public var tools: [String] { ["sh", "iperf3"] }
    public let name = "network"
    public static let metric = Metric("iperf3-tcp", "Network instance→host (iperf3 TCP)", unit: "Gbit/s", higherIsBetter: true)
    public static let receive = Metric("iperf3-tcp-reverse", "Network host→instance (iperf3 TCP -R)", unit: "Gbit/s", higherIsBetter: true)
    public static let latency = Metric("ping-rtt", "Network round trip to the host (ping, average)", unit: "ms", higherIsBetter: false)
    public init() {}
    public func metrics(for ctx: BenchContext) -> [Metric] { [Self.metric, Self.receive, Self.latency] }

    static func script(address: String, port: Int, seconds: Int) -> String {
        let client = "iperf3 -c \(address) -p \(port) -t \(seconds) -J"
        return """
        \(client) > /tmp/mvm-net-send 2>&1; s=$?
        \(client) -R > /tmp/mvm-net-recv 2>&1; r=$?
        ping -c 10 -i 0.2 -W 2 \(address) > /tmp/mvm-net-ping 2>&1
        echo @@send; cat /tmp/mvm-net-send; echo @@recv; cat /tmp/mvm-net-recv; echo @@ping; cat /tmp/mvm-net-ping
        rm -f /tmp/mvm-net-send /tmp/mvm-net-recv /tmp/mvm-net-ping
        [ $s -eq 0 ] && [ $r -eq 0 ]
        """
    }

    public func measure(_ target: BenchTarget, _ ctx: BenchContext) async throws -> [Measurement] {
        let (net, addr) = try target.link()
        let server = try IperfServer.start()
        defer { server.stop() }
        let r = try await ctx.run(target, ["sh", "-c", Self.script(address: addr, port: server.port, seconds: Int(ctx.durations.networkSeconds))],
                                  tag: "net", net: net)
        let text = try requireSuccess(r, "iperf3")
        guard let send = text.range(of: "@@send"), let recv = text.range(of: "@@recv"), let ping = text.range(of: "@@ping"),
              send.upperBound <= recv.lowerBound, recv.upperBound <= ping.lowerBound else {
            throw MicroVMError(.backend, "the network script's output lacks its markers: \(text.suffix(300))")
        }
        let details = ["path": net == nil ? "host loopback" : "per-instance link to \(addr)"]
        var out: [Measurement] = []
        for (metric, part) in [(Self.metric, text[send.upperBound..<recv.lowerBound]), (Self.receive, text[recv.upperBound..<ping.lowerBound])] {
            if let bps = ToolParsers.iperfBitsPerSecond(String(part)) { out.append(Measurement(metric, bps / 1e9, details: details)) }
            else { throw MicroVMError(.backend, "iperf3 printed no bits_per_second: \(part.suffix(300))") }
        }
        let pingText = String(text[ping.upperBound...])
        if let rtt = ToolParsers.pingAverageMilliseconds(pingText) { out.append(Measurement(Self.latency, rtt, details: details)) }
        else { out.append(.unavailable(Self.latency, "ping gave no round-trip time (raw ICMP may be refused here): \(pingText.suffix(160).trimmingCharacters(in: .whitespacesAndNewlines))")) }
        return out
    }
}

/// An iperf3 server on the host, on a free port, for one instance run's clients; stopped (and
/// reaped) by `stop()`.
final class IperfServer: Sendable {
    let process: ChildProcess
    let port: Int
    private init(process: ChildProcess, port: Int) { self.process = process; self.port = port }

    static func start() throws -> IperfServer {
        guard ProcessRunner.which("iperf3") != nil else { throw ScenarioUnavailable("iperf3 is not installed on the host: apt-get install iperf3") }
        let port = 20000 + Int(getpid() % 20000) + Int.random(in: 0..<500)
        let p = try ChildProcess(["iperf3", "-s", "-p", "\(port)", "--bind", "0.0.0.0"])
        usleep(300_000)  // let it listen before a client connects
        if let status = p.exitStatus {
            throw MicroVMError(.backend, "the iperf3 server on port \(port) exited at once with status \(status) (port taken?)")
        }
        return IperfServer(process: p, port: port)
    }

    /// SIGKILL: the server would otherwise wait for clients forever.
    func stop() {
        process.signal(SIGKILL)
        _ = process.wait()
    }
}
