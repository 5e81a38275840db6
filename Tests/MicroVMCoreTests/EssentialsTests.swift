import Testing
import Foundation
import Synchronization
@testable import MicroVMCore

/// The Foundation-free helpers the VMM process uses instead of Foundation's.
@Suite struct EssentialsTests {
    @Test func cFormatFormatsAsPrintfDoes() {
        #expect(cFormat("%.1f", 2.25) == String(format: "%.1f", 2.25))
        #expect(cFormat("%08x", UInt32(0xbeef)) == "0000beef")
        #expect(cFormat("%02x:%02x", 10, 255) == "0a:ff")
        #expect(cFormat("%g", 1.0) == "1" && cFormat("%g", 0.5) == "0.5")
        #expect(cFormat("100%%") == "100%")
        // Past the first buffer's 128 bytes: measured, then written whole.
        let long = String(repeating: "x", count: 1000)
        #expect(cFormat("%d-" + long, 7) == "7-" + long)
    }

    @Test func trimmedDropsSpaceAndLineEndsOnly() {
        #expect(" \t a b \n\r\n".trimmed() == "a b")
        #expect("\n\n".trimmed() == "")
        #expect("x".trimmed() == "x")
        #expect("  1M ".dropFirst().trimmed() == "1M")
    }

    @Test func nativeThreadRunsNamedWithItsStack() throws {
        let done = Atomic<Bool>(false)
        let name = Mutex<String>("")
        try NativeThread.detach(name: "a-name-longer-than-fifteen", stackSize: 1 << 20) {
            var buffer = [CChar](repeating: 0, count: 32)
            let fd = open("/proc/thread-self/comm", O_RDONLY)
            if fd >= 0 { _ = read(fd, &buffer, 31); close(fd) }
            name.withLock { $0 = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self).trimmed() }
            done.store(true, ordering: .releasing)
        }
        let deadline = Monotonic.seconds() + 10
        while !done.load(ordering: .acquiring), Monotonic.seconds() < deadline { usleep(1000) }
        let ran = done.load(ordering: .acquiring), seen = name.withLock { $0 }
        #expect(ran)
        #expect(seen == "a-name-longer-t", "the kernel keeps the first 15 bytes")
    }

    @Test func posixConditionWakesAWaiter() throws {
        let condition = PosixCondition()
        let flag = Atomic<Bool>(false), woke = Atomic<Bool>(false)
        try NativeThread.detach(name: "waiter") {
            condition.lock()
            while !flag.load(ordering: .acquiring) { condition.wait() }
            condition.unlock()
            woke.store(true, ordering: .releasing)
        }
        usleep(20_000)
        let early = woke.load(ordering: .acquiring)
        #expect(!early, "the waiter waits for the broadcast")
        condition.lock()
        flag.store(true, ordering: .releasing)
        condition.broadcast()
        condition.unlock()
        let deadline = Monotonic.seconds() + 10
        while !woke.load(ordering: .acquiring), Monotonic.seconds() < deadline { usleep(1000) }
        let late = woke.load(ordering: .acquiring)
        #expect(late)
    }

    /// Dropping the read-only pages unmaps code and constants from this process's page tables,
    /// and the process runs on: what it still needs faults back from the page cache.
    /// /proc files come whole, past the first read's page (Foundation's readers stop there).
    @Test func procFilesAreReadToTheirEnd() throws {
        let smaps = try #require(readWholeText("/proc/self/smaps"))
        var wc = 0
        let fd = open("/proc/self/smaps", O_RDONLY)
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(fd, &buffer, buffer.count)
            if n <= 0 { break }
            wc += n
        }
        close(fd)
        #expect(wc > 16384, "this test process maps dozens of regions")
        #expect(abs(smaps.utf8.count - wc) < wc / 4, "read \(smaps.utf8.count) bytes of about \(wc)")
        #expect(smaps.contains("[stack]") && smaps.hasSuffix("\n"))
        #expect(readWholeFile("/nonexistent/\(getpid())") == nil)
    }

    @Test func droppedReadOnlyPagesComeBackOnlyWhenTouched() throws {
        /// Resident KiB of the file-backed mappings that are not writable.
        func residentReadOnly() throws -> Int {
            let smaps = try #require(readWholeText("/proc/self/smaps"))
            var total = 0, readOnlyFile = false
            for line in smaps.split(separator: "\n") {
                let fields = line.split(separator: " ", omittingEmptySubsequences: true)
                if fields.count >= 6, fields[0].contains("-"), fields[1].count == 4 {
                    readOnlyFile = !fields[1].contains("w") && fields[5].hasPrefix("/")
                } else if readOnlyFile, fields.first == "Rss:", fields.count >= 2 {
                    total += Int(fields[1]) ?? 0
                }
            }
            return total
        }
        let before = try residentReadOnly()
        let advised = try #require(ExecutableImage.dropResidentPages(), "madvise refused: errno \(errno)")
        let after = try residentReadOnly()
        #expect(advised > 1 << 20, "the executable's read-only segments span megabytes")
        #expect(before > 1024 && after < before / 2, "resident read-only KiB: \(before) before, \(after) after")
        // Code that ran before runs again.
        #expect(cFormat("%d", 42) == "42")
    }

    /// The one affinity shim: a thread of its own (the test's threads stay as they were) pins
    /// itself to one CPU and reads the kernel's view back; a CPU outside the mask is refused.
    @Test func setAffinityPinsTheThreadItNames() throws {
        // The first CPU this process may use (a cpuset may leave out CPU 0).
        let own = try String(contentsOfFile: "/proc/self/status", encoding: .utf8).split(separator: "\n")
            .first { $0.hasPrefix("Cpus_allowed_list:") }.map { $0.dropFirst("Cpus_allowed_list:".count).trimmed() } ?? ""
        let cpu = try #require(Int(own.prefix { $0.isNumber }), "Cpus_allowed_list '\(own)'")
        let result = Mutex<(rc: Int32, allowed: String, tooHigh: Int32)?>(nil)
        try NativeThread.detach(name: "pin-test") {
            let rc = NativeThread.setAffinity(to: [cpu])
            let status = (try? String(contentsOfFile: "/proc/thread-self/status", encoding: .utf8)) ?? ""
            let allowed = status.split(separator: "\n").first { $0.hasPrefix("Cpus_allowed_list:") }
                .map { $0.dropFirst("Cpus_allowed_list:".count).trimmed() } ?? ""
            result.withLock { $0 = (rc, allowed, NativeThread.setAffinity(to: [cpu, 5000])) }
        }
        let deadline = Monotonic.seconds() + 10
        while result.withLock({ $0 }) == nil, Monotonic.seconds() < deadline { usleep(1000) }
        let r = try #require(result.withLock { $0 })
        #expect(r.rc == 0 && r.allowed == "\(cpu)", "rc \(r.rc), Cpus_allowed_list '\(r.allowed)'")
        #expect(r.tooHigh == EINVAL)
        #expect(NativeThread.currentID() > 0)
    }
}
