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
    return out
}
