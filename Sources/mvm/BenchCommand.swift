import ArgumentParser
import MicroVM

struct BenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "bench", abstract: "(in progress)")
    func run() async throws { throw MicroVMError.unsupported("mvm bench is not built yet") }
}
