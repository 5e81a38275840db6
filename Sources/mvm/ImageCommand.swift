import ArgumentParser
import MicroVM

struct ImageCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "image", abstract: "(in progress)")
    func run() async throws { throw MicroVMError.unsupported("mvm image is not built yet") }
}
