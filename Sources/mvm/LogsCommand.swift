import ArgumentParser
import MicroVM

struct LogsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "logs", abstract: "(in progress)")
    func run() async throws { throw MicroVMError.unsupported("mvm logs is not built yet") }
}
