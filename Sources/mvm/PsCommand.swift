import ArgumentParser
import MicroVM

struct PsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "ps", abstract: "(in progress)")
    func run() async throws { throw MicroVMError.unsupported("mvm ps is not built yet") }
}
