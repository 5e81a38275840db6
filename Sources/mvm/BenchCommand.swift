import ArgumentParser
import Foundation
import MicroVM

struct BenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Measure what VM and container isolation cost: scenarios × backends, same slice and binaries, ratios to native.",
        subcommands: [BenchRunCommand.self, BenchCompareCommand.self],
        defaultSubcommand: BenchRunCommand.self)
}

struct BenchRunCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Run the benchmark matrix and write results.json, results.md and charts/*.svg.",
        discussion: "Backends that cannot run on this host are listed as 'unavailable: <reason>'. Numbers from VMs under TCG or an emulated KVM are labelled so. After the measurements, an isolation audit runs a probe once inside each backend (what kernel, processes, devices and system calls an instance reaches); --audit runs only that.")

    @Flag(help: "Short workloads; 5 repeats, 1 for emulated VMs (start and cpu only) and the noisy neighbour: minutes on a small host (the default).") var quick = false
    @Flag(help: "Longer workloads, every scenario on every backend, 5 repeats each, for steadier numbers.") var full = false
    @Option(help: "Comma-separated backends: \(BackendCatalog.knownNames.joined(separator: ","))") var backends = BackendCatalog.defaultNames.joined(separator: ",")
    @Option(help: "Comma-separated scenarios: \(Scenarios.names.joined(separator: ","))") var scenarios = Scenarios.names.joined(separator: ",")
    @Option(name: .customLong("repeat"), help: "Repeats per cell, after one discarded warm-up (default 5; --quick gives emulated VMs 1 and the noisy neighbour 1).") var repeats: Int?
    @Option(help: "Directory for results.json, results.md and charts/.") var out = "bench-results"
    @Option(help: "Config profile giving every instance's slice.") var profile = "bench"
    @Option(help: "Workload binaries: 'image' (the default image's rootfs; built if needed) or 'host' (the host's own /, native and containers only).") var workload = "image"
    @Option(help: "Run every scenario on this container image instead (a 'docker save' tarball or a tar of an OCI image layout): its rootfs is the containers' root and native's chroot, its disk the VMs' root disk (the default image's kernel boots it). Scenarios whose programs the image lacks read unavailable, naming them.")
    var image: String?
    @Flag(help: "Print the results JSON to stdout instead of the Markdown table.") var json = false
    @Flag(help: "Run only the isolation audit (one probe instance per backend), not the scenarios.") var audit = false

    func run() async throws {
        try await reportingErrors {
            if quick && full { throw MicroVMError.invalidArgument("choose one of --quick and --full") }
            let preset = full ? "full" : "quick"
            var durations: BenchDurations = full ? .full : .quick
            if !full { durations.victimSeconds = 2 }
            // Five a cell: the fewest with which `bench compare` can call a change at p < 0.01.
            let n = repeats ?? 5
            guard n >= 1 else { throw MicroVMError.invalidArgument("--repeat must be at least 1") }
            let names = backends.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
            for name in names where !BackendCatalog.knownNames.contains(name) {
                throw MicroVMError.invalidArgument("unknown backend '\(name)': choose from \(BackendCatalog.knownNames.joined(separator: ", "))")
            }
            // --quick keeps the attacks that test containment; --full adds the disk and network hogs.
            let chosen = try Scenarios.named(scenarios.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }).map { s -> any BenchScenario in
                s is NoisyNeighbour && !full ? NoisyNeighbour(aggressors: [.cpuHog, .memoryBomb, .forkBomb]) : s
            }
            let config = try MicroVMConfig.load()
            let slice = try config.profile(named: profile).slice()
            let host = HostProfile.current()
            if image != nil && workload != "image" { throw MicroVMError.invalidArgument("--image gives the workload its rootfs; --workload \(workload) does too: drop one of them") }
            let (load, guestImage) = try image.map { try BenchWorkload.resolve(image: $0) } ?? BenchWorkload.resolve(workload)
            let targets = BackendCatalog.targets(names, host: host, factories: BackendCatalog.standardFactories(image: guestImage))
            // Every instance is granted its slice by the allocator, as `mvm run` is.
            let slices = SliceSource.open(config: config)
            var plan = BenchPlan(scenarios: audit ? [] : chosen, targets: targets, repeats: n,
                                 context: BenchContext(workload: load, slice: slice, durations: durations, slices: slices),
                                 preset: preset, profile: profile,
                                 emulatedVMRepeats: full || repeats != nil ? nil : 1,
                                 emulatedVMScenarios: full ? nil : ["start", "cpu", "vmm", "containerd"])
            if !full && repeats == nil {
                plan.scenarioRepeatCap = ["noisy-neighbour": 1]
                plan.warmupSkipped = ["noisy-neighbour": "--quick runs it once; each repeat runs the victim alone before the attacks"]
            }
            let dir = out
            let runner = BenchRunner(plan: plan, progress: { FileHandleOutput.stderr($0 + "\n") }, checkpoint: { partial in
                // After every cell: a run that is killed keeps what it measured.
                do {
                    try Paths.ensureDirectory(dir)
                    try partial.encoded().write(to: URL(fileURLWithPath: dir + "/results.json"), options: .atomic)
                } catch {
                    FileHandleOutput.stderr("[bench] warning: cannot write \(dir)/results.json: \(error)\n")
                }
            })
            var report = await runner.run(host: host)
            var isolation = IsolationAudit(context: plan.context, progress: { FileHandleOutput.stderr($0 + "\n") })
            // With the containerd scenario chosen, the audit also looks from inside containerd's pods.
            isolation.containerd = chosen.lazy.compactMap { $0 as? ContainerdScenario }.first
            report.audit = await isolation.run(targets)
            let files = try BenchOutput.write(report, to: out)
            FileHandleOutput.stderr("[bench] wrote \(files.json), \(files.markdown) and \(files.charts.count) charts in \(out)/charts\n")
            if json { print(String(decoding: try report.encoded(), as: UTF8.self)) }
            else if audit, let a = report.audit { print(MarkdownReport.renderAudit(a)) }
            else { print(MarkdownReport.render(report)) }
        }
    }
}

struct BenchCompareCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "compare",
        abstract: "Compare two results files from one host: per cell, whether it changed beyond the noise.",
        discussion: """
        A cell is called better or worse only when a Mann–Whitney test on one value per repeat gives p < 0.01 \
        and the median moved by more than the floor, with at least 5 repeats a side. Non-native backends are \
        compared by their per-repeat ratio to native measured in the same run, so drift of the whole machine \
        between runs cancels; native itself is compared raw, against --raw-floor. Cells that went from ok to \
        failed (or back) are reported as such. See docs/bench-schema.md.
        """)

    @Argument(help: "The earlier results.json.") var before: String
    @Argument(help: "The later results.json.") var after: String
    @Option(help: "Smallest change in % (points for % metrics) that may be called a change.") var floor = 5.0
    @Option(help: "Smallest change in % for raw comparisons (native), which run-to-run host drift moves.") var rawFloor = 25.0
    @Flag(help: "Compare results from different hosts anyway (CPU model, cores, kernel or memory differ).") var allowDifferentHosts = false
    @Flag(help: "Print the comparison as JSON.") var json = false

    func run() async throws {
        try await reportingErrors {
            guard floor >= 0, rawFloor >= 0 else { throw MicroVMError.invalidArgument("--floor and --raw-floor must not be negative") }
            let a = try BenchReport.load(path: before), b = try BenchReport.load(path: after)
            let options = BenchComparison.Options(floorPercent: floor, rawFloorPercent: rawFloor, allowDifferentHosts: allowDifferentHosts)
            let changes = try BenchComparison.compare(a, b, options: options)
            if json {
                let e = JSONEncoder(); e.outputFormatting = [.prettyPrinted, .sortedKeys]
                print(String(decoding: try e.encode(changes), as: UTF8.self))
            } else {
                print(BenchComparison.markdown(changes, options: options))
            }
        }
    }
}

/// Where the bench gets its binaries and real backends from.
enum BenchWorkload {
    static func resolve(_ kind: String) throws -> (Workload, GuestImage?) {
        switch kind {
        case "host": return (.host, nil)
        case "image":
            FileHandleOutput.stderr("[bench] preparing the default guest image (built once, then cached)\n")
            let image = try ImageStore().ensureDefault()
            return (Workload(image: image), image)
        default: throw MicroVMError.invalidArgument("--workload must be 'image' or 'host' (got '\(kind)')")
        }
    }

    /// A container image as every backend's workload: its tree for containers and native, its
    /// disk (converted once, cached by content) for VMs, which boot the default image's kernel.
    static func resolve(image path: String) throws -> (Workload, GuestImage?) {
        let image = try ContainerImageStore().prepare(tarball: path, disk: true)
        FileHandleOutput.stderr("[bench] preparing the default guest image's kernel (built once, then cached)\n")
        let guest = try ImageStore().ensureDefault()
        return (Workload(kernel: guest.kernel, initrd: guest.initrd, rootfsDisk: image.rootfsDisk, rootfsTree: image.rootfsTree,
                         kernelVersion: guest.kernelVersion, source: "image \((path as NSString).lastPathComponent) (sha256 \(image.digest.prefix(12)))"), guest)
    }
}
