import Testing
@testable import Launch
import MicroVMCore

/// The rebalancing policy: what a guest should have for what it uses.
@Suite struct RebalanceTests {
    let policy = RebalancePolicy(headroom: 0.25, floor: .mebibytes(128), step: .mebibytes(32))

    @Test func anIdleGuestShrinksToItsUsePlusHeadroomAndABusyOneGrows() {
        // 200 MiB used of 1 GiB: 250 MiB.
        #expect(policy.target(GuestMemoryUse(boot: .gibibytes(1), current: .gibibytes(1), used: .mebibytes(200))) == .mebibytes(250))
        // 30 MiB used: the floor.
        #expect(policy.target(GuestMemoryUse(boot: .gibibytes(1), current: .gibibytes(1), used: .mebibytes(30))) == .mebibytes(128))
        // 240 MiB used of the 256 MiB it has now: back up, at most to its launch size.
        #expect(policy.target(GuestMemoryUse(boot: .gibibytes(1), current: .mebibytes(256), used: .mebibytes(240))) == .mebibytes(300))
        #expect(policy.target(GuestMemoryUse(boot: .mebibytes(512), current: .mebibytes(256), used: .mebibytes(500))) == .mebibytes(512))
    }

    @Test func smallChangesAndUnknownUseAreLeftAlone() {
        #expect(policy.target(GuestMemoryUse(boot: .gibibytes(1), current: .mebibytes(260), used: .mebibytes(200))) == nil, "250 vs 260: under the step")
        #expect(policy.target(GuestMemoryUse(boot: .gibibytes(1), current: .gibibytes(1), used: nil)) == nil)
        #expect(RebalancePolicy(headroom: .nan).target(GuestMemoryUse(boot: .gibibytes(1), current: .gibibytes(1), used: .mebibytes(1))) == nil)
    }

    /// Use from the balloon's figures: with deflate-on-OOM the guest's total keeps the balloon,
    /// whose pages are not available; without, the total has shrunk by it.
    @Test func useIsTheGuestsTotalLessAvailableAndTheBalloon() {
        let boot = ByteCount.mebibytes(512)
        let deflating = GuestMemoryUse(boot: boot, balloonPages: 256 * 256, guestTotal: 512 << 20, guestAvailable: 156 << 20)
        #expect(deflating.current == .mebibytes(256) && deflating.used == .mebibytes(100))
        let shrunk = GuestMemoryUse(boot: boot, balloonPages: 256 * 256, guestTotal: 250 << 20, guestAvailable: 150 << 20)
        #expect(shrunk.used == .mebibytes(100))
        #expect(GuestMemoryUse(boot: boot, balloonPages: 0, guestTotal: nil, guestAvailable: 1).used == nil)
        #expect(GuestMemoryUse(boot: boot, balloonPages: 0, guestTotal: 100, guestAvailable: 200).used == ByteCount(0))
    }
}
