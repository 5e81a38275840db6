import Foundation
import MicroVM

/// Capabilities reported by modules beyond the host profile (guest image, nested rig).
func extraCapabilities() -> [(String, Capability)] {
    var out: [(String, Capability)] = []
    let images = ImageStore().list()
    if let current = images.first(where: \.isCurrent) {
        out.append(("image", Capability(usable: true, detail: "\(current.directory) (kernel \(current.kernelVersion), \(current.moduleCount) modules, PVH note: \(current.hasPVHNote ? "yes" : "no"))")))
    } else {
        out.append(("image", Capability(usable: false, detail: images.isEmpty ? "no guest image built" : "the built image is out of date with its recipe",
                                        fix: "mvm image build")))
    }
    out.append(("ledger", ledgerHealth()))
    out.append(("vmm-jail", VMMProcess.jailCheck()))
    return out
}

/// The allocator's ledger scanned page by page (launches skip this scan).
func ledgerHealth(paths: Paths = .default) -> Capability {
    guard FileManager.default.fileExists(atPath: paths.ledger) else {
        return Capability(usable: true, detail: "no ledger yet at \(paths.ledger): the first grant creates it")
    }
    do {
        let allocator = try Allocator.open(paths: paths, config: try MicroVMConfig.load())
        try allocator.verifyLedger()
        return Capability(usable: true, detail: "\(paths.ledger) passes SQLite's integrity check; \(try allocator.grants().count) grants held")
    } catch let e as MicroVMError {
        return Capability(usable: false, detail: e.message, fix: "mv \(paths.ledger) \(paths.ledger).bad (a new ledger is created at the next grant)")
    } catch {
        return Capability(usable: false, detail: "\(error)")
    }
}
