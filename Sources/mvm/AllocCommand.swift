import ArgumentParser
import MicroVM

struct AllocCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "alloc", abstract: "(in progress)")
    func run() async throws { throw MicroVMError.unsupported("mvm alloc is not built yet") }
}
