import Foundation
import Testing
import CLibvirt
import MicroVMCore
@testable import Libvirt

/// The pieces a live vCPU change stands on: libvirt's time-out is a time-out by its error code
/// (not by its wording), and QEMU's vCPU threads are found by the names QEMU gives them.
@Suite struct HostedControlTests {
    @Test func libvirtsOperationTimeoutIsATimeout() {
        let f = LibvirtFailure(code: Int32(bitPattern: VIR_ERR_OPERATION_TIMEOUT.rawValue), domain: 0, message: "vcpu unplug request timed out")
        #expect(f.error("cannot set the vCPUs").code == .timeout)
        #expect(LibvirtFailure(code: Int32(bitPattern: VIR_ERR_INTERNAL_ERROR.rawValue), domain: 0, message: "x").error("y").code == .backend)
    }

    /// A thread of this process named as QEMU names a vCPU thread is found with its index; the
    /// others are found without one.
    @Test func vcpuThreadsAreFoundByQEMUsNames() {
        let ready = DispatchSemaphore(value: 0), done = DispatchSemaphore(value: 0)
        let t = Thread {
            // The kernel's name for the thread, as QEMU sets it (Foundation's `name` may not reach it).
            try? "CPU 3/KVM".write(toFile: "/proc/thread-self/comm", atomically: false, encoding: .utf8)
            ready.signal()
            done.wait()
        }
        t.start()
        ready.wait()
        defer { done.signal() }
        let threads = HostedBackend.qemuThreads(of: getpid())
        #expect(threads.contains { $0.vcpu == 3 }, "\(threads)")
        #expect(threads.contains { $0.vcpu == nil && $0.tid == getpid() })
    }
}

/// When a hosted guest dies before its result, the error carries the end of libvirt's QEMU log.
@Suite struct QEMULogTailTests {
    @Test func theEmbeddedRootsLogIsReadAndOtherDriversGiveNothing() throws {
        let root = NSTemporaryDirectory() + "mvm-qemulog-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: root) }
        try FileManager.default.createDirectory(atPath: root + "/log/qemu", withIntermediateDirectories: true)
        let lines = (1...10).map { "line \($0)" } + [String(repeating: "x", count: 1000)]
        try lines.joined(separator: "\n").write(toFile: root + "/log/qemu/mvm-t.log", atomically: true, encoding: .utf8)
        let embedded = HostedBackend(connect: "qemu:///embed?root=\(root)")
        #expect(embedded.qemuLogTail(domain: "mvm-t", lines: 3) == "line 9\nline 10\n" + String(repeating: "x", count: 300))
        #expect(embedded.qemuLogTail(domain: "absent").isEmpty)
        #expect(HostedBackend(connect: "qemu+ssh://h/system").qemuLogTail(domain: "mvm-t").isEmpty)
    }
}
