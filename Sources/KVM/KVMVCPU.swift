import CKVM
import MicroVMCore
#if canImport(Glibc)
import Glibc
#endif

/// Why `KVM_RUN` returned, decoded from the `kvm_run` page into plain values so that exit
/// handling can be a pure function tested with made-up exits.
public enum VCPUExit: Sendable, Equatable {
    /// Port I/O. `data` holds what the guest wrote (`size * count` bytes) for an `out`.
    case portIn(port: UInt16, size: Int, count: Int)
    case portOut(port: UInt16, size: Int, count: Int, data: ExitBytes)
    case mmioRead(address: UInt64, length: Int)
    case mmioWrite(address: UInt64, data: ExitBytes)
    case halt
    /// Triple fault or another shutdown condition.
    case shutdown
    /// `KVM_EXIT_SYSTEM_EVENT`: 1 shutdown, 2 reset, 3 crash (`KVM_SYSTEM_EVENT_*`).
    case systemEvent(type: UInt32)
    /// KVM could not emulate or deliver something; suberror 1 is an emulation failure.
    case internalError(suberror: UInt32, data: [UInt64])
    case failEntry(hardwareReason: UInt64, cpu: UInt32)
    /// `KVM_RUN` returned EINTR/EAGAIN or `KVM_EXIT_INTR`: a kick, not a guest event.
    case interrupted
    case irqWindowOpen
    case unknown(reason: UInt32)
}

/// A vCPU: its fd and the mmapped `kvm_run` page. Register access and `run` are meant for the
/// one thread that runs this vCPU; only `requestImmediateExit` may be called from elsewhere.
public final class KVMVCPU: @unchecked Sendable {
    // SAFETY (Sendable): run-page fields other than immediate_exit are only touched by the
    // thread that calls `run`; immediate_exit is a single byte the kernel reads on entry.
    let fd: OwnedFD
    public let id: UInt32
    let runPage: UnsafeMutableRawPointer
    let runSize: Int
    var runState: UnsafeMutablePointer<kvm_run> { runPage.assumingMemoryBound(to: kvm_run.self) }

    init(fd: OwnedFD, id: UInt32, run: UnsafeMutableRawPointer, runSize: Int) {
        self.fd = fd; self.id = id; self.runPage = run; self.runSize = runSize
    }

    deinit { munmap(runPage, runSize) }

    // MARK: registers

    public func registers() throws -> kvm_regs {
        var r = kvm_regs()
        try kvmIoctl(fd.raw, CKVM_GET_REGS, "KVM_GET_REGS", &r)
        return r
    }

    public func setRegisters(_ regs: kvm_regs) throws {
        var r = regs
        try kvmIoctl(fd.raw, CKVM_SET_REGS, "KVM_SET_REGS", &r)
    }

    public func specialRegisters() throws -> kvm_sregs {
        var s = kvm_sregs()
        try kvmIoctl(fd.raw, CKVM_GET_SREGS, "KVM_GET_SREGS", &s)
        return s
    }

    public func setSpecialRegisters(_ sregs: kvm_sregs) throws {
        var s = sregs
        try kvmIoctl(fd.raw, CKVM_SET_SREGS, "KVM_SET_SREGS", &s)
    }

    /// x87 control word and MXCSR as after FNINIT/reset; other FPU state zero.
    public func setFPU(fcw: UInt16 = 0x37f, mxcsr: UInt32 = 0x1f80) throws {
        var f = kvm_fpu()
        f.fcw = fcw
        f.mxcsr = mxcsr
        try kvmIoctl(fd.raw, CKVM_SET_FPU, "KVM_SET_FPU", &f)
    }

    public func fpu() throws -> kvm_fpu {
        var f = kvm_fpu()
        try kvmIoctl(fd.raw, CKVM_GET_FPU, "KVM_GET_FPU", &f)
        return f
    }

    /// Sets all of `entries`; throws naming the first MSR KVM refused.
    public func setMSRs(_ entries: [MSREntry]) throws {
        guard !entries.isEmpty else { return }
        let stride = MemoryLayout<kvm_msr_entry>.stride
        let bytes = Int(CKVM_MSRS_ENTRIES_OFFSET) + entries.count * stride
        let buf = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 8)
        defer { buf.deallocate() }
        buf.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        // SAFETY: buf holds the header and entries.count entries.
        buf.storeBytes(of: UInt32(entries.count), as: UInt32.self)
        let p = (buf + Int(CKVM_MSRS_ENTRIES_OFFSET)).bindMemory(to: kvm_msr_entry.self, capacity: entries.count)
        for (i, e) in entries.enumerated() {
            p[i] = kvm_msr_entry(index: e.index, reserved: 0, data: e.value)
        }
        let n = try kvmIoctl(fd.raw, CKVM_SET_MSRS, "KVM_SET_MSRS", argument: UInt(bitPattern: buf))
        if Int(n) < entries.count {
            let bad = entries[Int(n)].index
            throw MicroVMError(.hypervisor, "KVM refused MSR 0x\(String(bad, radix: 16)) (set \(n) of \(entries.count)) — this host's KVM does not support it")
        }
    }

    /// Reads the given MSRs; those KVM does not know are left out.
    public func msrs(_ indices: [UInt32]) throws -> [MSREntry] {
        guard !indices.isEmpty else { return [] }
        let stride = MemoryLayout<kvm_msr_entry>.stride
        let bytes = Int(CKVM_MSRS_ENTRIES_OFFSET) + indices.count * stride
        let buf = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 8)
        defer { buf.deallocate() }
        buf.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        // SAFETY: as in setMSRs.
        buf.storeBytes(of: UInt32(indices.count), as: UInt32.self)
        let p = (buf + Int(CKVM_MSRS_ENTRIES_OFFSET)).bindMemory(to: kvm_msr_entry.self, capacity: indices.count)
        for (i, index) in indices.enumerated() { p[i].index = index }
        let n = try kvmIoctl(fd.raw, CKVM_GET_MSRS, "KVM_GET_MSRS", argument: UInt(bitPattern: buf))
        return (0..<min(Int(n), indices.count)).map { MSREntry(index: p[$0].index, value: p[$0].data) }
    }

    public func setCPUID(_ entries: [CPUIDEntry]) throws {
        let stride = MemoryLayout<kvm_cpuid_entry2>.stride
        let bytes = Int(CKVM_CPUID2_ENTRIES_OFFSET) + max(entries.count, 1) * stride
        let buf = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 8)
        defer { buf.deallocate() }
        buf.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        // SAFETY: buf holds the header and entries.count entries.
        buf.storeBytes(of: UInt32(entries.count), as: UInt32.self)
        let p = (buf + Int(CKVM_CPUID2_ENTRIES_OFFSET)).bindMemory(to: kvm_cpuid_entry2.self, capacity: max(entries.count, 1))
        for (i, e) in entries.enumerated() { p[i] = e.raw }
        try kvmIoctl(fd.raw, CKVM_SET_CPUID2, "KVM_SET_CPUID2", argument: UInt(bitPattern: buf))
    }

    /// The 1 KiB local APIC register page (KVM_GET_LAPIC).
    public func lapic() throws -> LAPICState {
        var s = kvm_lapic_state()
        try kvmIoctl(fd.raw, CKVM_GET_LAPIC, "KVM_GET_LAPIC", &s)
        return LAPICState(raw: s)
    }

    public func setLAPIC(_ state: LAPICState) throws {
        var s = state.raw
        try kvmIoctl(fd.raw, CKVM_SET_LAPIC, "KVM_SET_LAPIC", &s)
    }

    /// `KVM_MP_STATE_*`: 0 runnable, 1 uninitialized (waiting for INIT/SIPI), 3 halted.
    public func mpState() throws -> UInt32 {
        var s = kvm_mp_state()
        try kvmIoctl(fd.raw, CKVM_GET_MP_STATE, "KVM_GET_MP_STATE", &s)
        return s.mp_state
    }

    // MARK: running

    /// Makes the next or current `KVM_RUN` return EINTR at once. Safe from any thread; pair with a
    /// signal to the vCPU's thread to interrupt a guest that is already running.
    public func requestImmediateExit(_ on: Bool = true) {
        // SAFETY: a one-byte store into the shared run page; the kernel samples it on entry.
        (runPage + MemoryLayout<kvm_run>.offset(of: \kvm_run.immediate_exit)!).storeBytes(of: on ? 1 : 0, as: UInt8.self)
    }

    /// Enters the guest until it exits. Returns the decoded exit.
    public func run() throws -> VCPUExit {
        let r = ioctl(fd.raw, CKVM_RUN, CInt(0))
        if r < 0 {
            let e = errno
            if e == EINTR || e == EAGAIN { return .interrupted }
            throw KVMError.ioctl("KVM_RUN", errno: e)
        }
        return decodeExit()
    }

    /// Reads the exit out of the run page, checking every offset KVM gave against the mapping.
    func decodeExit() -> VCPUExit {
        let run = self.runState
        let reason = run.pointee.exit_reason
        switch Int32(reason) {
        case KVM_EXIT_IO:
            let io = run.pointee.io
            let size = Int(io.size), count = Int(io.count)
            let total = size * count
            let offset = Int(io.data_offset)
            guard size == 1 || size == 2 || size == 4, count >= 1, offset >= 0, total <= runSize, offset <= runSize - total else {
                return .unknown(reason: reason)
            }
            if io.direction == UInt8(KVM_EXIT_IO_OUT) {
                // SAFETY: [offset, offset+total) was checked to lie inside the run mapping.
                let bytes = ExitBytes(UnsafeRawBufferPointer(start: runPage + offset, count: total))
                return .portOut(port: io.port, size: size, count: count, data: bytes)
            }
            return .portIn(port: io.port, size: size, count: count)
        case KVM_EXIT_MMIO:
            let m = run.pointee.mmio
            let len = min(Int(m.len), 8)
            if m.is_write != 0 {
                var d = m.data
                let bytes = withUnsafeBytes(of: &d) { ExitBytes(UnsafeRawBufferPointer(rebasing: $0.prefix(len))) }
                return .mmioWrite(address: m.phys_addr, data: bytes)
            }
            return .mmioRead(address: m.phys_addr, length: len)
        case KVM_EXIT_HLT: return .halt
        case KVM_EXIT_SHUTDOWN: return .shutdown
        case KVM_EXIT_SYSTEM_EVENT: return .systemEvent(type: run.pointee.system_event.type)
        case KVM_EXIT_INTERNAL_ERROR:
            let ie = run.pointee.internal
            var data = ie.data
            let n = min(Int(ie.ndata), 16)
            let words = withUnsafeBytes(of: &data) { Array($0.bindMemory(to: UInt64.self).prefix(n)) }
            return .internalError(suberror: ie.suberror, data: words)
        case KVM_EXIT_FAIL_ENTRY:
            let f = run.pointee.fail_entry
            return .failEntry(hardwareReason: f.hardware_entry_failure_reason, cpu: f.cpu)
        case KVM_EXIT_INTR: return .interrupted
        case KVM_EXIT_IRQ_WINDOW_OPEN: return .irqWindowOpen
        default: return .unknown(reason: reason)
        }
    }

    /// Supplies the bytes for the pending `in` exit (`size * count` of them).
    public func completePortIn(_ bytes: [UInt8]) { bytes.withUnsafeBytes { completePortIn($0) } }

    public func completePortIn(_ bytes: UnsafeRawBufferPointer) {
        let io = runState.pointee.io
        let offset = Int(io.data_offset)
        let n = min(bytes.count, Int(io.size) * Int(io.count))
        guard n > 0, offset >= 0, offset <= runSize - n else { return }
        // SAFETY: bounds checked against the run mapping just above.
        (runPage + offset).copyMemory(from: bytes.baseAddress!, byteCount: n)
    }

    /// Supplies the value for the pending MMIO read.
    public func completeMMIORead(_ bytes: [UInt8]) { bytes.withUnsafeBytes { completeMMIORead($0) } }

    public func completeMMIORead(_ bytes: UnsafeRawBufferPointer) {
        // SAFETY: mmio.data is an 8-byte array inside the run page; at most 8 bytes are copied.
        withUnsafeMutableBytes(of: &runState.pointee.mmio.data) { d in
            for i in 0..<min(8, bytes.count) { d[i] = bytes[i] }
        }
    }
}

/// The local APIC register page, with typed access to the 32-bit registers.
public struct LAPICState: Sendable {
    var raw: kvm_lapic_state
    init(raw: kvm_lapic_state) { self.raw = raw }
    public init() { raw = kvm_lapic_state() }

    /// Local vector table entries and other registers by their offset in the APIC page.
    public static let lvtLINT0 = 0x350
    public static let lvtLINT1 = 0x360
    public static let spuriousVector = 0xF0

    public func register(_ offset: Int) -> UInt32 {
        guard offset >= 0, offset + 4 <= 1024 else { return 0 }
        var r = raw.regs
        return withUnsafeBytes(of: &r) { $0.loadUnaligned(fromByteOffset: offset, as: UInt32.self) }
    }

    public mutating func setRegister(_ offset: Int, _ value: UInt32) {
        guard offset >= 0, offset + 4 <= 1024 else { return }
        withUnsafeMutableBytes(of: &raw.regs) { $0.storeBytes(of: value, toByteOffset: offset, as: UInt32.self) }
    }
}
