import ArgumentParser
import Foundation
import MicroVM

struct PsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "ps", abstract: "List instances of every mode (direct, hosted, container).")
    @Option(help: "libvirt URI for hosted instances.") var connect: String?
    @Flag(help: "Print JSON.") var json = false

    func run() async throws {
        try await reportingErrors {
            var all: [InstanceInfo] = []
            var problems: [String] = []
            for b in Backends.all(connect: connect) {
                do { all += try await b.list() } catch { problems.append("\(b.mode.rawValue): \(error)") }
            }
            if json {
                let enc = JSONEncoder()
                enc.outputFormatting = [.prettyPrinted, .sortedKeys]
                enc.dateEncodingStrategy = .iso8601
                print(String(decoding: try enc.encode(all), as: UTF8.self))
            } else {
                print("NAME".padding(toLength: 24, withPad: " ", startingAt: 0) + "MODE       STATE      CPUS  MEMORY  PID      NOTE")
                for i in all {
                    print(i.name.padding(toLength: 24, withPad: " ", startingAt: 0)
                          + i.mode.rawValue.padding(toLength: 11, withPad: " ", startingAt: 0)
                          + i.state.padding(toLength: 11, withPad: " ", startingAt: 0)
                          + "\(i.cpus)".padding(toLength: 6, withPad: " ", startingAt: 0)
                          + i.memory.description.padding(toLength: 8, withPad: " ", startingAt: 0)
                          + (i.pid.map { "\($0)" } ?? "-").padding(toLength: 9, withPad: " ", startingAt: 0)
                          + (i.note ?? ""))
                }
            }
            for p in problems { FileHandleOutput.stderr("mvm ps: \(p)\n") }
        }
    }
}

/// Removes what killed runs left behind: every mode's stale records with their taps, cgroups,
/// runtime state and run files (the same sweep `mvm ps` makes), then the ledger's grants whose
/// owner and holder are both gone.
struct GcCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "gc", abstract: "Remove what killed runs left behind (taps, cgroups, records, containers) and reclaim their grants.")
    @Option(help: "libvirt URI for hosted instances.") var connect: String?

    func run() async throws {
        try await reportingErrors {
            var running = 0
            for b in Backends.all(connect: connect) {
                do { running += try await b.list().count } catch { FileHandleOutput.stderr("mvm gc: \(b.mode.rawValue): \(error)\n") }
            }
            let reclaimed = try Allocator.open(paths: .default, config: try MicroVMConfig.load()).reclaimDead()
            print("reclaimed \(reclaimed.count) grant\(reclaimed.count == 1 ? "" : "s") of runs that are gone; \(running) instance\(running == 1 ? "" : "s") still running")
            for g in reclaimed { print("  #\(g.id) \(g.owner) \(g.mode)") }
        }
    }
}
