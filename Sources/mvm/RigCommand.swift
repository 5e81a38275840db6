import ArgumentParser
import MicroVM

struct RigCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "rig", abstract: "(in progress)")
    func run() async throws { throw MicroVMError.unsupported("mvm rig is not built yet") }
}
