import ArgumentParser
import MicroVM

struct DoctorCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "doctor", abstract: "(in progress)")
    func run() async throws { throw MicroVMError.unsupported("mvm doctor is not built yet") }
}
