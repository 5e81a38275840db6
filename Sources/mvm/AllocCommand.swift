import ArgumentParser
import Foundation
import MicroVM

struct AllocCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "alloc", abstract: "Show, plan and release the host's CPU and memory grants.",
        subcommands: [AllocShow.self, AllocPlan.self, AllocRelease.self, AllocGrant.self, AllocRebalance.self, AllocBenchCommand.self], defaultSubcommand: AllocShow.self)
}

/// Where the allocator reads the host and its configuration from.
struct AllocHostOptions: ParsableArguments {
    @Option(help: "Configuration file (default: MVM_CONFIG, config/microvm.yaml, /etc/microvm/microvm.yaml).") var config: String?
    // Tests point the allocator at a fake host: DIR/proc and DIR/sys.
    @Option(help: .hidden) var hostRoot: String?

    func open() throws -> Allocator {
        let cfg = try MicroVMConfig.load(path: config)
        let roots = hostRoot.map { HostRoots(proc: $0 + "/proc", sys: $0 + "/sys") } ?? HostRoots()
        return try Allocator.open(paths: .default, config: cfg, roots: roots)
    }
}

struct AllocRequestOptions: ParsableArguments {
    @Option(help: "Number of CPUs.") var cpus: Int
    @Option(help: "Memory, e.g. 512M or 2G.") var memory: String
    @Option(help: "dedicated, pinned or shared.") var placement: String = "shared"
    @Option(help: "Exact host CPUs for a pinned placement, e.g. 2-3.") var cpuList: String?
    @Option(help: "CPU weight, 1...10000.") var weight: Int = 100
    @Option(help: "CPU quota in CPUs, e.g. 1.5.") var quota: Double?
    @Flag(help: "Back the memory with huge pages.") var hugePages = false
    @Option(help: "Maximum number of tasks.") var pidsLimit: Int?

    func request(owner: String, pid: Int32?) throws -> SliceRequest {
        SliceRequest(cpus: cpus, placement: try Placement(parsing: placement), weight: weight, quota: quota,
                     memory: try ByteCount(parsing: memory), hugePages: hugePages, pidsLimit: pidsLimit,
                     owner: owner, ownerPID: pid, cpuSet: try cpuList.map(CPUList.parse))
    }
}

func printJSON<T: Encodable>(_ value: T) throws {
    let enc = JSONEncoder()
    enc.outputFormatting = [.prettyPrinted, .sortedKeys]
    enc.dateEncodingStrategy = .iso8601
    print(String(decoding: try enc.encode(value), as: UTF8.self))
}

func describe(_ s: ResourceSlice) -> String {
    var t = "\(s.placement.rawValue) \(s.cpus) CPU\(s.cpus == 1 ? "" : "s") on \(s.cpuSetList), \(s.memory) memory, weight \(s.cpuWeight)"
    if let q = s.cpuQuota { t += ", quota \(q) CPUs" }
    if s.hugePages { t += ", huge pages" }
    if let p = s.pidsLimit { t += ", pids \(p)" }
    if let n = s.numaNode { t += ", NUMA node \(n)" }
    return t
}

struct AllocShow: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "show", abstract: "Capacity, reservation, live grants and what is free.")
    @OptionGroup var host: AllocHostOptions
    @Flag(help: "Print JSON.") var json = false

    struct Report: Encodable {
        var ledger: String
        var capacity: HostCapacity
        var usage: Allocator.Usage
        var grants: [Grant]
    }

    func run() async throws {
        try await reportingErrors {
            let a = try host.open()
            let report = Report(ledger: a.ledgerPath, capacity: a.capacity, usage: try a.usage(), grants: try a.grants())
            if json { try printJSON(report); return }
            let c = a.capacity, u = report.usage
            print("ledger      \(report.ledger)")
            print("CPUs        online \(CPUList.format(c.onlineCPUs)), reserved \(c.reservedCPUs.isEmpty ? "none" : CPUList.format(c.reservedCPUs)), \(c.cores.count) cores, \(c.nodes.count) NUMA node\(c.nodes.count == 1 ? "" : "s")")
            print("memory      \(c.memoryTotal) total, \(c.reservedMemory) reserved, \(u.memoryGrantable) grantable, \(u.memoryUsed) granted, \(u.memoryFree) free (shared overcommit \(c.memoryOvercommit))")
            print("huge pages  \(c.hugePages.total) × \(c.hugePages.pageSize), \(u.hugePagesUsed) granted, \(u.hugePagesFree) free")
            print("dedicated   \(u.dedicatedCPUs.isEmpty ? "-" : CPUList.format(u.dedicatedCPUs)); pinned \(u.pinnedCPUs.isEmpty ? "-" : CPUList.format(u.pinnedCPUs)); shared pool \(u.sharedPool.isEmpty ? "-" : CPUList.format(u.sharedPool)); free for dedicated \(u.freeDedicatedCPUs.isEmpty ? "-" : CPUList.format(u.freeDedicatedCPUs))")
            print("grants      \(report.grants.count)")
            for g in report.grants {
                let held = g.holder.map { " held by \($0.what) pid \($0.pid)" } ?? ""
                print("  #\(g.id) \(g.owner) pid \(g.pid.map(String.init) ?? "-")\(held) \(g.mode.isEmpty ? "" : g.mode + " ")\(describe(g.slice))")
            }
        }
    }
}

struct AllocPlan: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "plan", abstract: "What a request would be granted now, or why it would be refused; grants nothing.")
    @OptionGroup var host: AllocHostOptions
    @OptionGroup var request: AllocRequestOptions
    @Flag(help: "Print JSON.") var json = false

    struct Answer: Encodable {
        var granted: Bool
        var slice: ResourceSlice?
        var refusal: String?
    }

    func run() async throws {
        try await reportingErrors {
            let a = try host.open()
            let r = try request.request(owner: "plan", pid: nil)
            do {
                let slice = try a.plan(r)
                if json { try printJSON(Answer(granted: true, slice: slice)) } else { print("would grant: \(describe(slice))") }
            } catch let e as MicroVMError where e.code == .insufficientResources {
                if json { try printJSON(Answer(granted: false, refusal: e.message)) } else { print("would refuse: \(e.message)") }
                throw ExitCode(1)
            }
        }
    }
}

struct AllocRelease: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "release", abstract: "Release a grant by id, all grants of an owner, or those of dead owners.")
    @OptionGroup var host: AllocHostOptions
    @Argument(help: "Grant id.") var id: Int64?
    @Option(help: "Release every grant of this owner.") var owner: String?
    @Flag(help: "Release the grants whose owner process is gone.") var dead = false
    @Flag(help: "Print JSON.") var json = false

    func validate() throws {
        guard [id != nil, owner != nil, dead].filter({ $0 }).count == 1 else {
            throw ValidationError("give exactly one of a grant id, --owner NAME or --dead")
        }
    }

    func run() async throws {
        try await reportingErrors {
            let a = try host.open()
            let released: [Grant]
            if let id {
                guard let g = try a.release(id) else { throw MicroVMError.notFound("no live grant #\(id): see mvm alloc show") }
                released = [g]
            } else if let owner {
                released = try a.release(owner: owner)
            } else {
                released = try a.reclaimDead()
            }
            if json { try printJSON(released); return }
            print("released \(released.count) grant\(released.count == 1 ? "" : "s")")
            for g in released { print("  #\(g.id) \(g.owner) \(describe(g.slice))") }
        }
    }
}

/// Grants a slice from the command line, held until the owner process exits. Scripts and the
/// multi-process ledger tests use it; `mvm run` allocates through the library.
struct AllocGrant: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "grant", abstract: "Grant a slice to an owner process.", shouldDisplay: false)
    @OptionGroup var host: AllocHostOptions
    @OptionGroup var request: AllocRequestOptions
    @Option(help: "Owner name.") var owner: String
    @Option(help: "Owner pid (default: the calling process).") var pid: Int32?
    @Flag(help: "Print JSON.") var json = false

    func run() async throws {
        try await reportingErrors {
            let a = try host.open()
            let g = try a.allocate(try request.request(owner: owner, pid: pid ?? getppid()))
            if json { try printJSON(g) } else { print("granted #\(g.id): \(describe(g.slice))") }
        }
    }
}

/// Times one placement decision against a temporary ledger full of live grants.
struct AllocBenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "bench", abstract: "Time a placement decision with many live grants.")
    @Option(help: "Live grants in the ledger.") var grants: Int = 10_000
    @Option(help: "Decisions to time.") var samples: Int = 200

    func run() async throws {
        try await reportingErrors {
            let (median, p99) = try AllocatorBench.placementDecisionTime(liveGrants: grants, samples: samples)
            print(String(format: "placement decision with %d live grants: median %.0f µs, p99 %.0f µs", grants, median, p99))
        }
    }
}

struct AllocRebalance: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rebalance",
        abstract: "Move memory between running VMs with balloons: idle guests give back what they do not use, busy ones get theirs back.",
        discussion: """
            Each VM started with --balloon gets what its guest uses plus the headroom, at least the floor and at most \
            its launch size; changes smaller than the step are left alone. Shrinks go first, then growths, each \
            admitted by the allocator like mvm update. Containers and VMs without a balloon are not moved.
            Example: mvm alloc rebalance --headroom 0.5 --dry-run
            """)
    @Option(help: "Memory above what the guest uses, as a fraction (0.25: a quarter more).") var headroom: Double = 0.25
    @Option(help: "No guest goes below this, e.g. 128M.") var floor: String = "128M"
    @Option(help: "Changes smaller than this are left alone, e.g. 32M.") var step: String = "32M"
    @Flag(help: "Print the moves without making them.") var dryRun = false
    @Flag(help: "Print JSON.") var json = false
    @Option(help: "libvirt URI for hosted instances.") var connect: String?
    @OptionGroup var host: AllocHostOptions

    func run() async throws {
        try await reportingErrors {
            guard headroom.isFinite, (0...10).contains(headroom) else {
                throw MicroVMError.invalidArgument("--headroom \(headroom) is out of range: give a fraction from 0 to 10 (0.25 is a quarter more)")
            }
            let policy = RebalancePolicy(headroom: headroom, floor: try ByteCount(parsing: floor), step: try ByteCount(parsing: step))
            var instances: [(info: InstanceInfo, backend: any InstanceBackend)] = []
            for backend in Backends.all(connect: connect) {
                for info in (try? await backend.list()) ?? [] where info.state == "running" { instances.append((info, backend)) }
            }
            let rebalancer = InstanceRebalancer(updater: InstanceUpdater(allocator: try host.open()), policy: policy)
            let moves = await rebalancer.run(instances, apply: !dryRun)
            if json { return try printJSON(moves) }
            guard !moves.isEmpty else { return print("no running VM has a balloon: start VMs with --balloon to move their memory") }
            print("NAME".padding(toLength: 24, withPad: " ", startingAt: 0) + "MODE    USED      NOW       TARGET    OUTCOME")
            func col(_ b: ByteCount?) -> String { (b.map { "\($0)" } ?? "-").padding(toLength: 10, withPad: " ", startingAt: 0) }
            for m in moves {
                print(m.name.padding(toLength: 24, withPad: " ", startingAt: 0) + m.mode.rawValue.padding(toLength: 8, withPad: " ", startingAt: 0)
                      + col(m.use.used) + col(m.use.current) + col(m.target) + m.outcome)
            }
        }
    }
}
