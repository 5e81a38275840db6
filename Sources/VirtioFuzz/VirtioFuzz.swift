import MicroVMCore
/// Fuzzes the virtio transport, split virtqueue, the blk/rng/net request parsers and vsock's
/// configuration with hostile guest input (see `VirtioFuzzHarness` for the input layout), and
/// the control API's request parser and router with hostile client bytes (`APIFuzzHarness`):
/// an input whose first byte has its top bit set goes to the API.
///
/// Built with `-sanitize=fuzzer -D VIRTIO_LIBFUZZER` (scripts/fuzz-virtio) it is a libFuzzer
/// target; built plainly it feeds seeded random inputs for a bounded time:
///
/// ```
/// swift run VirtioFuzz 60        # seconds; prints iterations, exits non-zero on a failure
/// ```
import Devices
import Foundation
import VMMAPI

#if VIRTIO_LIBFUZZER
let apiHarness = APIFuzzHarness()
nonisolated(unsafe) let harness: VirtioFuzzHarness = {
    guard let h = try? VirtioFuzzHarness() else { fatalError("cannot allocate the fuzzing guest RAM") }
    return h
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func virtioFuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let data else { return 0 }
    let input = Array(UnsafeBufferPointer(start: data, count: size))
    if let first = input.first, first & 0x80 != 0 { apiHarness.run(Array(input.dropFirst())) } else { harness.run(input) }
    return 0
}

@_silgen_name("LLVMFuzzerRunDriver")
func runFuzzerDriver(_ argc: UnsafeMutablePointer<Int32>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
                     _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> Int32) -> Int32

/// SwiftPM links an executable's entry as `<Target>_main`; hand control to libFuzzer's driver.
@_cdecl("VirtioFuzz_main")
public func virtioFuzzMain(_ argc: Int32, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> Int32 {
    var argc = argc
    var argv = argv
    return runFuzzerDriver(&argc, &argv, virtioFuzzOne)
}
#else
typealias SplitMix = SeededGenerator

@main
struct VirtioFuzz {
    static func main() throws {
        let args = CommandLine.arguments
        let seconds = args.count > 1 ? Double(args[1]) ?? 60 : 60
        let seed = args.count > 2 ? UInt64(args[2]) ?? 1 : 1
        var rng = SplitMix(state: seed)
        let harness = try VirtioFuzzHarness()
        let api = APIFuzzHarness()
        var routed = 0
        let deadline = Date().addingTimeInterval(seconds)
        var iterations = 0, served = 0
        while Date() < deadline {
            // Mostly small inputs (ring-sized), sometimes large ones reaching the buffers.
            let n = Int.random(in: 0...(Bool.random(using: &rng) ? 512 : 16384), using: &rng)
            var input = (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) }
            if n > 8, Bool.random(using: &rng) {
                // Bias towards plausible rings: small descriptor indices and flags.
                for i in stride(from: 4, to: n, by: 2) where Int.random(in: 0..<4, using: &rng) == 0 { input[i] &= 0x7 }
            }
            // Every other input goes to the API, as a client's bytes.
            if iterations % 2 == 1 { routed += api.run(input) } else { served += harness.run(input) }
            iterations += 1
        }
        print("virtio and API fuzz: \(iterations) inputs in \(Int(seconds)) s (seed \(seed)), \(served) chains served, \(routed) API requests routed, no crash")
    }
}
#endif
