import Foundation
import GuestMemory
import MicroVMCore
import Testing

struct GuestRAMTests {
    /// The kernel's flags for the mapping that holds `address` ("hg": huge pages advised,
    /// "nh": not), from /proc/self/smaps.
    func vmFlags(at address: UInt) throws -> [Substring] {
        let smaps = try #require(readWholeText("/proc/self/smaps"))
        var inside = false
        for line in smaps.split(separator: "\n") {
            let fields = line.split(separator: " ")
            if let range = fields.first, range.contains("-"), !range.hasSuffix(":") {
                let ends = range.split(separator: "-").compactMap { UInt($0, radix: 16) }
                inside = ends.count == 2 && ends[0] <= address && address < ends[1]
            } else if inside, line.hasPrefix("VmFlags:") {
                return Array(fields.dropFirst())
            }
        }
        throw MicroVMError.invalidArgument("no mapping holds \(String(address, radix: 16))")
    }

    /// Huge pages are advised for guest RAM but its first 2 MiB, where the boot tables would
    /// otherwise cost the zeroing of a whole huge page.
    @Test func theBootTablesAreaKeepsSmallPages() throws {
        let ram = try GuestRAM(size: ByteCount(64 << 20))
        let low = UInt(bitPattern: try ram.hostPointer(at: GuestAddress(0x1000), count: 8))
        let high = UInt(bitPattern: try ram.hostPointer(at: GuestAddress(GuestRAM.lowSmallPages), count: 8))
        let end = UInt(bitPattern: try ram.hostPointer(at: GuestAddress((64 << 20) - 8), count: 8))
        #expect(try vmFlags(at: low).contains("nh"))
        #expect(try !vmFlags(at: low).contains("hg"))
        #expect(try vmFlags(at: high).contains("hg"))
        #expect(try vmFlags(at: end).contains("hg"))
        withExtendedLifetime(ram) {}
    }
}
