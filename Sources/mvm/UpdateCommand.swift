import ArgumentParser
import Foundation
import MicroVM

struct UpdateCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "update",
        abstract: "Resize a running instance: its grant and its limits change together, or nothing changes.",
        discussion: """
            The change is admitted like a launch: one that does not fit is refused with what is short, and \
            nothing changes. Containers change every limit live (runc, crun or runsc update; docker update). \
            Direct VMs change their CPU weight and quota live; their vCPUs and memory are fixed at launch.
            Example: mvm update web-1 --cpus 2 --memory 1G
            """)
    @OptionGroup var instance: InstanceArguments
    @Option(help: "Number of CPUs.") var cpus: Int?
    @Option(help: "Memory, e.g. 512M or 2G.") var memory: String?
    @Option(help: "CPU weight, 1...10000 (100 is the default).") var weight: Int?
    @Option(help: "CPU quota in CPUs, e.g. 1.5 (at most --cpus).") var quota: Double?
    @Option(help: "Configuration file (default: MVM_CONFIG, config/microvm.yaml, /etc/microvm/microvm.yaml).") var config: String?
    @Flag(help: "Print the new grant as JSON.") var json = false

    func run() async throws {
        try await reportingErrors {
            let change = Allocator.Resize(cpus: cpus, memory: try memory.map { try ByteCount(parsing: $0) }, weight: weight, quota: quota)
            guard !change.isEmpty else {
                throw MicroVMError.invalidArgument("nothing to change: give --cpus, --memory, --weight or --quota")
            }
            let backend = try await instance.backend()
            let allocator = try Allocator.open(paths: .default, config: try MicroVMConfig.load(path: config))
            let grant = try await InstanceUpdater(allocator: allocator).update(name: instance.name, change, on: backend)
            if json {
                try printJSON(grant)
            } else {
                print("updated \(instance.name): \(describe(grant.slice))")
            }
        }
    }
}
