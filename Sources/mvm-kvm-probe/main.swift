// mvm-kvm-probe: the KVM functional probe of `mvm doctor` on its own, as JSON, with no
// dependency on libvirt or libguestfs — small enough to copy to a host that lacks them.
import Foundation
import KVM

let result = KVMFunctionalProbe.run(devicePath: CommandLine.arguments.dropFirst().first ?? "/dev/kvm")
let enc = JSONEncoder()
enc.outputFormatting = [.prettyPrinted, .sortedKeys]
print(String(decoding: try enc.encode(result), as: UTF8.self))
exit(result.verdict == .absent ? 1 : 0)
