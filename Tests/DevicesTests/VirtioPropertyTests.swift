import MicroVMCore
import Devices
import Testing

/// Random queue contents, features and register writes never trap or hang the device.
@Suite("Virtio random input")
struct VirtioPropertyTests {
    typealias SplitMix = SeededGenerator

    @Test(arguments: [1, 2, 3, 4] as [UInt64])
    func randomQueuesNeverTrap(seed: UInt64) throws {
        var rng = SplitMix(state: seed)
        let harness = try VirtioFuzzHarness()
        var ran = 0, served = 0
        for _ in 0..<150 {
            let n = Int.random(in: 0...4096, using: &rng)
            var input = (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) }
            if n > 3 { input[2] |= 8 }  // plausible rings, so the request parsers run too
            served += harness.run(input)
            ran += 1
        }
        #expect(ran == 150)
        // After all that, a well-formed request is still served.
        #expect(harness.run(Self.validRngInput()) == 1)
        print("seed \(seed): \(served) random chains served")
    }

    /// A valid ring in the harness layout: rng, queue of 1, one 32-byte writable buffer.
    static func validRngInput() -> [UInt8] {
        var input: [UInt8] = [1, 0, 0, 0]
        var desc = [UInt8](repeating: 0, count: 16)
        withUnsafeBytes(of: UInt64(0x20000).littleEndian) { desc.replaceSubrange(0..<8, with: $0) }
        withUnsafeBytes(of: UInt32(32).littleEndian) { desc.replaceSubrange(8..<12, with: $0) }
        desc[12] = 2  // WRITE
        input += desc
        input += [0, 0, 1, 0, 0, 0]  // avail: flags 0, idx 1, ring[0] = 0
        return input
    }

    @Test func validRngChainIsServed() throws {
        #expect(try VirtioFuzzHarness().run(Self.validRngInput()) == 1)
    }
}
