import ArgumentParser
import MicroVM

struct StopCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stop", abstract: "(in progress)")
    func run() async throws { throw MicroVMError.unsupported("mvm stop is not built yet") }
}
