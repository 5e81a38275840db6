import ArgumentParser
import MicroVM

struct RunCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "run", abstract: "(in progress)")
    func run() async throws { throw MicroVMError.unsupported("mvm run is not built yet") }
}
