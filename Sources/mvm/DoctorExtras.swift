import MicroVM

/// Capabilities reported by modules beyond the host profile (guest image, nested rig).
func extraCapabilities() -> [(String, Capability)] {
    []
}
