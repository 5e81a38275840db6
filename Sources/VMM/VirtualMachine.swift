import CKVM
import Devices
import Dispatch
import FoundationEssentials
import Dispatch
import GuestMemory
import KVM
import MicroVMCore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// What to build: the machine's shape, independent of what it boots.
public struct MachineConfiguration: Sendable {
    public var cpus: Int
    public var memory: ByteCount
    /// The in-kernel PIC/IOAPIC/LAPICs and PIT. Linux needs them; tiny test guests turn them off
    /// so that `hlt` exits to the VMM instead of waiting for an interrupt.
    public var interruptController: Bool
    /// vCPU i → the host CPUs its thread may run on (`Enforcement.vcpuPins`); empty: no pinning.
    public var vcpuPins: [[Int]]
    /// Back guest RAM with huge pages (from the host's hugetlbfs pool).
    public var hugePages: Bool
    public var devicePath: String
    /// Called on each vCPU thread as it starts (after pinning), with its thread id.
    public var onVCPUThread: (@Sendable (Int32) -> Void)?

    public init(cpus: Int = 1, memory: ByteCount = .mebibytes(128), interruptController: Bool = true, cpuSet: [Int] = [], devicePath: String = "/dev/kvm") {
        self.cpus = cpus; self.memory = memory; self.interruptController = interruptController
        self.vcpuPins = cpuSet.isEmpty ? [] : (0..<cpus).map { [cpuSet[$0 % cpuSet.count]] }
        self.hugePages = false
        self.devicePath = devicePath
    }

    /// The machine an enforcement describes: its vCPUs, RAM, pins and page size.
    public init(enforcement e: Enforcement, interruptController: Bool = true, devicePath: String = "/dev/kvm") {
        self.init(cpus: e.cpus, memory: e.memory, interruptController: interruptController, devicePath: devicePath)
        self.vcpuPins = e.vcpuPins
        self.hugePages = e.hugePages
    }
}

/// A VM on raw KVM, assembled in one order: memory → VM → irqchip/PIT → vCPUs; the caller then
/// adds devices and loads a kernel (or a test guest) and calls `run`. One thread per vCPU.
public final class VirtualMachine: @unchecked Sendable {
    // SAFETY (Sendable): immutable after init except `control` (a Mutex), the atomics and
    // `parking` (a PosixCondition, used only under its own lock).

    /// CLOCK_MONOTONIC seconds when construction began: the origin of every timestamp here.
    public let createdAt: Double
    /// The same moment on the clock the boot timer device reads.
    public let createdInstant: ContinuousClock.Instant
    public let configuration: MachineConfiguration
    public let memory: GuestRAM
    public let kvm: KVMSystem
    public let vm: KVMVirtualMachine
    public let vcpus: [KVMVCPU]
    public let portBus = IOBus()
    public let mmioBus = IOBus()

    private struct Control {
        var reason: StopReason?
        var threads: [pthread_t?]
        var started = false
        var registerDump: String?
    }
    private let control: Mutex<Control>
    private let stopping = Atomic<Bool>(false)
    /// Set while the VM is paused: vCPUs leave the guest and park until it clears.
    private let pausing = Atomic<Bool>(false)
    private let parkedCount = Atomic<Int>(0)
    private let parking = PosixCondition()
    /// Exits to the VMM by kind and time in KVM_RUN, one set per vCPU: the vCPU threads never
    /// share a counter's cache line in their exit path (`exitCounts`, `guestSeconds`).
    let exitCounters: [ExitCounters]
    private let firstExitBits = Atomic<UInt64>(0)
    private let firstEntryBits = Atomic<UInt64>(0)
    /// CLOCK_MONOTONIC seconds when vCPU 0 first entered the guest (nil before).
    public var firstEntry: Double? {
        let b = firstEntryBits.load(ordering: .acquiring)
        return b == 0 ? nil : Double(bitPattern: b)
    }
    /// Virtqueue notify registers that KVM signals through an eventfd (no exit per kick).
    public let ioeventfdsRegistered = Atomic<Int>(0)
    /// Device interrupt lines that KVM injects from an eventfd (irqfd).
    public let irqfdsRegistered = Atomic<Int>(0)
    private let group = DispatchGroup()
    /// Left by each vCPU thread as it first enters the guest (or ends without entering).
    private let entering = DispatchGroup()

    public init(_ configuration: MachineConfiguration) throws {
        createdAt = Monotonic.seconds()
        createdInstant = ContinuousClock.now
        guard (1...255).contains(configuration.cpus) else {
            throw MicroVMError.invalidArgument("a direct VM needs 1 to 255 vCPUs (got \(configuration.cpus))")
        }
        self.configuration = configuration
        memory = try GuestRAM(size: configuration.memory, hugePages: configuration.hugePages)
        kvm = try KVMSystem(path: configuration.devicePath)
        vm = try kvm.createVM()
        try vm.setTSSAddress(X86Layout.tssAddress)
        try vm.setIdentityMapAddress(X86Layout.identityMapAddress)
        for (slot, region) in memory.regions.enumerated() {
            try vm.setUserMemoryRegion(slot: UInt32(slot), guestAddress: region.guestBase.rawValue, size: region.size, host: region.host)
        }
        if configuration.interruptController {
            try vm.createIRQChip()
            try vm.createPIT2()
        }
        let supportedCPUID = try kvm.supportedCPUID()
        let msrs = BootMSRs.filtered(supported: (try? kvm.msrIndexList()) ?? [])
        var made: [KVMVCPU] = []
        for i in 0..<configuration.cpus {
            let vcpu = try vm.createVCPU(id: UInt32(i))
            try vcpu.setCPUID(CPUIDPolicy.adjust(supportedCPUID, vcpu: i, count: configuration.cpus))
            try vcpu.setMSRs(msrs)
            try vcpu.setFPU()
            if configuration.interruptController {
                var lapic = try vcpu.lapic()
                LAPICSetup.configure(&lapic)
                try vcpu.setLAPIC(lapic)
            }
            made.append(vcpu)
        }
        vcpus = made
        exitCounters = made.map { _ in ExitCounters() }
        control = Mutex(Control(threads: Array(repeating: nil, count: configuration.cpus)))
    }

    /// A GSI of the in-kernel irqchip as a device's interrupt line.
    public func interruptLine(gsi: UInt32) -> KVMInterruptLine { KVMInterruptLine(vm: vm, gsi: gsi) }

    public func addPortDevice(_ device: any BusDevice, port: UInt16, length: UInt16) throws {
        try portBus.insert(device, at: UInt64(port), length: UInt64(length))
    }

    public func addMMIODevice(_ device: any BusDevice, address: UInt64, length: UInt64) throws {
        try mmioBus.insert(device, at: address, length: length)
    }

    /// Writes the GDT/IDT (and, for long mode, the identity map) and sets the boot vCPU's
    /// registers. Secondary vCPUs stay in wait-for-SIPI; the in-kernel LAPIC starts them.
    public func setBootEntry(_ entry: BootEntry) throws {
        switch entry.mode {
        case .real: break
        case .long64:
            for (i, e) in X86LongMode.gdt.enumerated() { try memory.write(e, at: GuestAddress(X86Layout.gdt + UInt64(i) * 8)) }
            try memory.write(UInt64(0), at: GuestAddress(X86Layout.idt))
            for (a, v) in X86Layout.pageTables.entries { try memory.write(v, at: GuestAddress(a)) }
        case .pvh32:
            for (i, e) in X86Layout.pvhGDT.enumerated() { try memory.write(e, at: GuestAddress(X86Layout.gdt + UInt64(i) * 8)) }
            try memory.write(UInt64(0), at: GuestAddress(X86Layout.idt))
        }
        let bsp = vcpus[0]
        var sregs = try bsp.specialRegisters()
        BootRegisters.configure(&sregs, for: entry)
        try bsp.setSpecialRegisters(sregs)
        try bsp.setRegisters(BootRegisters.registers(for: entry))
    }

    // MARK: running

    /// CLOCK_MONOTONIC seconds from `createdAt` to the boot vCPU's first exit to the VMM.
    public var firstExitSeconds: Double? {
        let bits = firstExitBits.load(ordering: .acquiring)
        return bits == 0 ? nil : Double(bitPattern: bits) - createdAt
    }

    /// Registers of the vCPU that stopped the VM abnormally (triple fault, KVM error).
    public var registerDump: String? { control.withLock { $0.registerDump } }

    /// Starts one thread per vCPU. Call once.
    public func start() throws {
        VCPUKick.install()
        try control.withLock { c in
            guard !c.started else { throw MicroVMError(.internalError, "VM started twice") }
            c.started = true
        }
        for i in vcpus.indices {
            group.enter()
            entering.enter()
            do {
                try NativeThread.detach(name: "vcpu\(i)", stackSize: 1 << 20) { [self] in
                    vcpuLoop(i)
                    control.withLock { $0.threads[i] = nil }
                    group.leave()
                }
            } catch {
                // The vCPUs already running stop; `wait()` then returns for them.
                entering.leave()
                group.leave()
                requestStop(.error("cannot start vCPU \(i)'s thread: \(error)"))
                throw error
            }
        }
    }

    /// Waits until every vCPU thread has made its first KVM_RUN (or ended before it), at most
    /// `timeout` seconds; false on the timeout.
    public func waitUntilVCPUsEnter(timeout: Double) -> Bool {
        entering.wait(timeout: .now() + timeout) == .success
    }

    /// Asks every vCPU to leave the guest and its thread to end. The first reason given wins.
    public func requestStop(_ reason: StopReason = .requested) {
        control.withLock { c in
            if c.reason == nil { c.reason = reason }
            stopping.store(true, ordering: .releasing)
            for (i, v) in vcpus.enumerated() {
                v.requestImmediateExit()
                // Kicked under the lock: a thread clears its entry under it before exiting,
                // so the pthread_t is alive here.
                if let t = c.threads[i] { pthread_kill(t, VCPUKick.signal) }
            }
        }
        parking.lock()
        parking.broadcast()
        parking.unlock()
    }

    /// Whether `pause` holds the vCPUs outside the guest.
    public var isPaused: Bool { pausing.load(ordering: .acquiring) }

    /// Takes every vCPU out of the guest and parks its thread; returns once all are parked (or
    /// have ended), or throws after `timeout` seconds with the VM resumed.
    public func pause(timeout: Double = 5) throws {
        guard control.withLock({ $0.started }), !stopping.load(ordering: .acquiring) else {
            throw MicroVMError(.invalidArgument, "the VM is not running, so it cannot be paused")
        }
        guard !pausing.exchange(true, ordering: .acquiringAndReleasing) else {
            throw MicroVMError(.invalidArgument, "the VM is already paused")
        }
        control.withLock { c in
            for (i, v) in vcpus.enumerated() {
                v.requestImmediateExit()
                if let t = c.threads[i] { pthread_kill(t, VCPUKick.signal) }
            }
        }
        let deadline = Monotonic.seconds() + timeout
        while parkedCount.load(ordering: .acquiring) < liveVCPUs() {
            guard Monotonic.seconds() < deadline else {
                try? resume()
                throw MicroVMError(.timeout, "the vCPUs did not leave the guest within \(timeout) s; the VM was left running")
            }
            usleep(200)
        }
    }

    /// Lets parked vCPUs enter the guest again.
    public func resume() throws {
        guard pausing.load(ordering: .acquiring) else { throw MicroVMError(.invalidArgument, "the VM is not paused") }
        parking.lock()
        for v in vcpus { v.requestImmediateExit(false) }
        pausing.store(false, ordering: .releasing)
        parking.broadcast()
        parking.unlock()
    }

    private func liveVCPUs() -> Int { control.withLock { c in c.threads.compactMap { $0 }.count } }

    /// Holds the calling vCPU thread while the VM is paused (or until it stops).
    private func parkWhilePaused(_ vcpu: KVMVCPU) {
        parking.lock()
        parkedCount.add(1, ordering: .releasing)
        while pausing.load(ordering: .acquiring) && !stopping.load(ordering: .acquiring) { parking.wait() }
        parkedCount.subtract(1, ordering: .releasing)
        parking.unlock()
        if !stopping.load(ordering: .acquiring) { vcpu.requestImmediateExit(false) }
    }

    /// How long stopped vCPUs may take to leave KVM_RUN before `wait` gives up on them.
    public static let stopGraceSeconds = 10.0

    /// Waits for all vCPU threads to end; after `timeout` seconds stops them with `.timeout`.
    /// A vCPU that a kernel keeps inside KVM_RUN despite the stop (a software KVM emulating a
    /// long instruction sequence) never hangs the caller: after `stopGraceSeconds` of re-kicking
    /// the wait ends with an error naming the vCPUs, whose threads are left to end on their own
    /// (they hold the machine alive until then, so nothing they touch is freed under them).
    public func wait(timeout: Double? = nil) -> StopReason {
        if let timeout {
            if group.wait(timeout: .now() + timeout) == .timedOut {
                requestStop(.timeout)
                let giveUp = Monotonic.seconds() + Self.stopGraceSeconds
                while group.wait(timeout: .now() + 0.25) == .timedOut {
                    if Monotonic.seconds() >= giveUp {
                        let stuck = control.withLock { c in c.threads.indices.filter { c.threads[$0] != nil } }
                        return .error("vCPU \(stuck.map(String.init).joined(separator: ", ")) did not leave KVM_RUN within "
                                      + "\(Int(Self.stopGraceSeconds)) s of the stop (run timeout \(timeout) s); the VM was abandoned")
                    }
                    requestStop(.timeout)
                }
            }
        } else {
            group.wait()
        }
        return control.withLock { $0.reason ?? .requested }
    }

    /// Boots `entry` and runs until the guest stops or `timeout` passes.
    public func run(_ entry: BootEntry, timeout: Double? = nil) throws -> StopReason {
        try setBootEntry(entry)
        try start()
        return wait(timeout: timeout)
    }

    private func vcpuLoop(_ index: Int) {
        let vcpu = vcpus[index]
        let counters = exitCounters[index]
        VCPUKick.unblockOnCurrentThread()
        control.withLock { $0.threads[index] = pthread_self() }
        if !configuration.vcpuPins.isEmpty {
            pin(to: configuration.vcpuPins[index % configuration.vcpuPins.count])
        }
        // After pinning: a jailed VMM confines the thread here, and a vCPU never pins again.
        configuration.onVCPUThread?(NativeThread.currentID())
        if index == 0 { firstEntryBits.store(Monotonic.seconds().bitPattern, ordering: .releasing) }
        var scratch = [UInt8](repeating: 0, count: 8)
        var entered = false
        defer { if !entered { entering.leave() } }
        while !stopping.load(ordering: .acquiring) {
            if pausing.load(ordering: .acquiring) {
                parkWhilePaused(vcpu)
                continue
            }
            let exit: VCPUExit
            let enteredAt = DispatchTime.now().uptimeNanoseconds
            if !entered { entered = true; entering.leave() }
            do {
                exit = try vcpu.run()
            } catch {
                requestStop(.error("vCPU \(index): \(error)"))
                break
            }
            counters.count(exit, inGuestFor: DispatchTime.now().uptimeNanoseconds &- enteredAt)
            if index == 0 && firstExitBits.load(ordering: .relaxed) == 0 {
                firstExitBits.store(Monotonic.seconds().bitPattern, ordering: .releasing)
            }
            switch ExitHandler.decide(exit) {
            case .resume:
                continue
            case .portRead(let port, let size, let count):
                // One `in` (8 bytes at most) reads into the scratch buffer; a `rep ins` gets its own.
                let total = size * count
                if total > scratch.count { scratch = [UInt8](repeating: 0, count: total) }
                scratch.withUnsafeMutableBytes { buf in
                    for k in 0..<count {
                        portBus.read(address: UInt64(port), data: UnsafeMutableRawBufferPointer(rebasing: buf[(k * size)..<((k + 1) * size)]))
                    }
                    vcpu.completePortIn(UnsafeRawBufferPointer(rebasing: buf[0..<total]))
                }
            case .portWrite(let port, let size, let data):
                data.withUnsafeBytes { buf in
                    var k = 0
                    while k + size <= buf.count {
                        portBus.write(address: UInt64(port), data: UnsafeRawBufferPointer(rebasing: buf[k..<(k + size)]))
                        k += size
                    }
                }
            case .mmioRead(let address, let length):
                scratch.withUnsafeMutableBytes { buf in
                    _ = mmioBus.read(address: address, data: UnsafeMutableRawBufferPointer(rebasing: buf[0..<length]))
                    vcpu.completeMMIORead(UnsafeRawBufferPointer(rebasing: buf[0..<length]))
                }
            case .mmioWrite(let address, let data):
                data.withUnsafeBytes { _ = mmioBus.write(address: address, data: $0) }
            case .stop(let reason, let dump):
                if dump {
                    let text = "vCPU \(index): " + Self.describeRegisters(vcpu)
                    control.withLock { if $0.registerDump == nil { $0.registerDump = text } }
                    if case .error(let m) = reason {
                        requestStop(.error(m + "\n" + text))
                        break
                    }
                }
                requestStop(reason)
            }
        }
    }

    private func pin(to cpus: [Int]) {
        let valid = cpus.filter { $0 >= 0 && $0 < NativeThread.affinityMaskBytes * 8 }
        guard !valid.isEmpty else { return }
        // Failure (an offline CPU, a cpuset that excludes it) leaves the thread unpinned, not broken.
        _ = NativeThread.setAffinity(to: valid)
    }


    static func describeRegisters(_ vcpu: KVMVCPU) -> String {
        guard let r = try? vcpu.registers(), let s = try? vcpu.specialRegisters() else { return "registers unavailable" }
        func h(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
        return "rip=\(h(r.rip)) rsp=\(h(r.rsp)) rflags=\(h(r.rflags)) rax=\(h(r.rax)) rbx=\(h(r.rbx)) rcx=\(h(r.rcx)) rdx=\(h(r.rdx)) rsi=\(h(r.rsi)) rdi=\(h(r.rdi)) "
            + "cs=\(h(UInt64(s.cs.selector)))/base \(h(s.cs.base)) cr0=\(h(s.cr0)) cr2=\(h(s.cr2)) cr3=\(h(s.cr3)) cr4=\(h(s.cr4)) efer=\(h(s.efer))"
    }
}
