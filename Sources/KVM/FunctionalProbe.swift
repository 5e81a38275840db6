import CKVM
import MicroVMCore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// What a functional test of /dev/kvm found.
public struct KVMProbeResult: Codable, JSONReadable, Sendable, Equatable {
    public enum Verdict: String, Codable, Sendable {
        /// VT-x/AMD-V: guest kernel code runs at native speed and every instruction works.
        case hardware
        /// A software KVM: VMs create, but CPL0 code is emulated slowly or instructions are missing.
        case emulated
        /// No usable /dev/kvm.
        case absent
    }
    public var verdict: Verdict
    public var reason: String
    public var apiVersion: Int?
    /// Nanoseconds per iteration of a short loop run at CPL0 in long mode.
    public var cpl0NanosecondsPerIteration: Double?
    /// Whether `lock cmpxchg16b` executed in the guest.
    public var cmpxchg16bWorks: Bool?

    public init(verdict: Verdict, reason: String, apiVersion: Int? = nil, cpl0NanosecondsPerIteration: Double? = nil, cmpxchg16bWorks: Bool? = nil) {
        self.verdict = verdict; self.reason = reason; self.apiVersion = apiVersion
        self.cpl0NanosecondsPerIteration = cpl0NanosecondsPerIteration; self.cmpxchg16bWorks = cmpxchg16bWorks
    }

    /// Read as the verdict cache wrote it (its Codable keys), without Codable.
    public init(json f: JSONFields) throws(JSONFieldError) {
        guard let v = try Verdict(rawValue: f.required("verdict", f.string)) else {
            throw JSONFieldError("field `\(f.path.isEmpty ? "" : f.path + ".")verdict` is not one of hardware, emulated, absent")
        }
        self.init(verdict: v, reason: try f.required("reason", f.string), apiVersion: try f.integer("apiVersion"),
                  cpl0NanosecondsPerIteration: try f.number("cpl0NanosecondsPerIteration"), cmpxchg16bWorks: try f.bool("cmpxchg16bWorks"))
    }
}

/// Decides whether this host's KVM can run a guest kernel by running a tiny long-mode guest at CPL0.
///
/// The guest (64-bit, CPL0, our GDT and identity map) does `out 0x12` (start mark), a counted
/// `dec rcx; jnz` loop, `out 0x10` (loop done), `lock cmpxchg16b [0x3000]`, `out 0x11`, `hlt`.
/// Hardware virtualization runs the loop at about a nanosecond per iteration; a software KVM
/// emulates CPL0 code thousands of times slower and may fail on cmpxchg16b outright.
/// A watchdog kicks the vCPU out after `deadline` so a stuck guest cannot hang the caller.
public enum KVMFunctionalProbe {
    /// Above this many ns per iteration, CPL0 code is being emulated. Measured: hardware KVM
    /// nested in the TCG rig 5–330 ns (idle to heavily loaded host), the software KVM of the
    /// development hosts 1,600–14,000 ns; bare-metal VT-x/AMD-V about 1 ns.
    public static let hardwareThresholdNanoseconds = 800.0
    static let iterations: UInt64 = 200_000
    static let deadline: Double = 0.9
    static let memorySize = 4 << 20
    static let codeAddress = 0x10000
    static let casAddress = 0x3000

    public static func run(devicePath: String = "/dev/kvm") -> KVMProbeResult {
        let system: KVMSystem
        do {
            system = try KVMSystem(path: devicePath)
        } catch {
            return KVMProbeResult(verdict: .absent, reason: String(describing: error))
        }
        let api = Int(system.apiVersion)
        do {
            return try measure(system)
        } catch {
            return KVMProbeResult(verdict: .emulated, reason: "a minimal long-mode VM failed to run: \(error)", apiVersion: api)
        }
    }

    static func program() -> [UInt8] {
        var c: [UInt8] = [0xe6, 0x12]                                   // out 0x12, al
        c += [0x48, 0xb9] + withUnsafeBytes(of: iterations.littleEndian, Array.init) // mov rcx, N
        c += [0x48, 0xff, 0xc9, 0x75, 0xfb]                             // 1: dec rcx; jnz 1b
        c += [0xe6, 0x10]                                               // out 0x10, al
        c += [0x31, 0xc0, 0x31, 0xd2, 0x31, 0xc9, 0xbb, 0x01, 0, 0, 0]  // xor eax,edx,ecx; mov ebx,1
        c += [0xbf] + withUnsafeBytes(of: UInt32(casAddress).littleEndian, Array.init) // mov edi, 0x3000
        c += [0xf0, 0x48, 0x0f, 0xc7, 0x0f]                             // lock cmpxchg16b [rdi]
        c += [0xe6, 0x11, 0xf4]                                         // out 0x11, al; hlt
        return c
    }

    static func measure(_ system: KVMSystem) throws -> KVMProbeResult {
        let api = Int(system.apiVersion)
        let vm = try system.createVM()
        try vm.setTSSAddress(0xfffb_d000)
        guard let mem = mmap(nil, memorySize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0), mem != MAP_FAILED else {
            throw MicroVMError(.insufficientResources, "cannot map 4M for the KVM probe", cause: SystemCallError("mmap", errno: errno))
        }
        defer { munmap(mem, memorySize) }
        // SAFETY: every offset written below is a constant well inside the 4 MiB mapping.
        for (i, e) in X86LongMode.gdt.enumerated() { (mem + 0x500 + i * 8).storeBytes(of: e, as: UInt64.self) }
        let tables = X86LongMode.PageTables(gibibytes: 1)
        for (a, v) in tables.entries { (mem + Int(a)).storeBytes(of: v, as: UInt64.self) }
        let code = program()
        code.withUnsafeBytes { (mem + codeAddress).copyMemory(from: $0.baseAddress!, byteCount: code.count) }
        try vm.setUserMemoryRegion(slot: 0, guestAddress: 0, size: UInt64(memorySize), host: mem)

        let vcpu = try vm.createVCPU(id: 0)
        if let cpuid = try? system.supportedCPUID() { try? vcpu.setCPUID(cpuid) }
        var sregs = try vcpu.specialRegisters()
        X86LongMode.configure(&sregs, gdtAddress: 0x500, idtAddress: 0x520, pml4: tables.pml4)
        try vcpu.setSpecialRegisters(sregs)
        var regs = kvm_regs()
        regs.rip = UInt64(codeAddress); regs.rflags = 0x2; regs.rsp = 0x8000
        try vcpu.setRegisters(regs)

        let mask = VCPUKick.unblockOnCurrentThread()
        let watchdog = Watchdog(vcpu: vcpu, seconds: deadline)
        defer { watchdog.cancel(); VCPUKick.restoreMask(mask) }
        var start: Double?, loopNanos: Double?, casResult: Bool?, casFailure = ""
        loop: while true {
            let exit = try vcpu.run()
            let now = Monotonic.seconds()
            switch exit {
            case .portOut(port: 0x12, _, _, _): start = now
            case .portOut(port: 0x10, _, _, _): if let start { loopNanos = (now - start) * 1e9 / Double(iterations) }
            case .portOut(port: 0x11, _, _, _):
                // SAFETY: casAddress is inside the mapping and 16-byte aligned.
                casResult = (mem + casAddress).load(as: UInt64.self) == 1
                if casResult == false { casFailure = "lock cmpxchg16b ran but did not store" }
            case .halt: break loop
            case .internalError(let sub, _) where loopNanos != nil:
                casResult = false
                casFailure = "lock cmpxchg16b stopped the vCPU with KVM internal error \(sub)\(sub == 1 ? " (emulation failure)" : "")"
                break loop
            case .interrupted:
                // Out of time: the loop counter still says how fast the guest was going.
                if let start, loopNanos == nil, let rcx = try? vcpu.registers().rcx, rcx < iterations {
                    loopNanos = (now - start) * 1e9 / Double(iterations - rcx)
                    casFailure = "lock cmpxchg16b was not reached within \(deadline) s"
                }
                break loop
            default:
                if loopNanos != nil && casResult == nil { casResult = false; casFailure = "lock cmpxchg16b ended in \(exit)" }
                break loop
            }
        }
        guard let ns = loopNanos else {
            return KVMProbeResult(verdict: .emulated, reason: "a \(iterations)-iteration CPL0 loop did not finish within \(deadline) s: guest kernel code is emulated, far too slow to boot Linux — use `mvm rig run`", apiVersion: api, cpl0NanosecondsPerIteration: nil, cmpxchg16bWorks: casResult)
        }
        let fast = ns < hardwareThresholdNanoseconds
        let casOK = casResult == true
        if fast && casOK {
            return KVMProbeResult(verdict: .hardware, reason: cFormat("CPL0 code runs at %.1f ns per loop iteration and lock cmpxchg16b works", ns),
                                  apiVersion: api, cpl0NanosecondsPerIteration: ns, cmpxchg16bWorks: true)
        }
        var why: [String] = []
        if !fast { why.append(cFormat("CPL0 code runs at %.0f ns per loop iteration (hardware: under %.0f)", ns, hardwareThresholdNanoseconds)) }
        if !casOK { why.append(casFailure.isEmpty ? "lock cmpxchg16b did not complete" : casFailure) }
        return KVMProbeResult(verdict: .emulated, reason: why.joined(separator: "; ") + ": a software KVM that cannot boot Linux — use `mvm rig run`",
                              apiVersion: api, cpl0NanosecondsPerIteration: ns, cmpxchg16bWorks: casOK)
    }
}

/// Kicks one vCPU out of KVM_RUN if it is still running after a deadline, and keeps kicking
/// (a signal can land just before the thread re-enters the guest) until cancelled.
public final class Watchdog: Sendable {
    private let done = Atomic<Bool>(false)

    public init(vcpu: KVMVCPU, seconds: Double, thread: pthread_t = pthread_self()) {
        VCPUKick.install()
        let deadline = Monotonic.seconds() + seconds
        // Without the thread, the vCPU is not kicked and the probe runs to its end: slow, not wrong.
        try? NativeThread.detach(name: "kvm-watchdog") { [self] in
            while !self.done.load(ordering: .acquiring) {
                if Monotonic.seconds() >= deadline { VCPUKick.kick(vcpu, thread: thread) }
                usleep(2_000)
            }
        }
    }

    public func cancel() { done.store(true, ordering: .releasing) }
}
