import CKVM
import MicroVMCore
#if canImport(Glibc)
import Glibc
#endif

/// One CPUID leaf as KVM reports and accepts it (`struct kvm_cpuid_entry2`).
public struct CPUIDEntry: Sendable, Hashable {
    public var function: UInt32
    public var index: UInt32
    /// `KVM_CPUID_FLAG_SIGNIFCANT_INDEX` (1) when `index` selects a sub-leaf.
    public var flags: UInt32
    public var eax: UInt32
    public var ebx: UInt32
    public var ecx: UInt32
    public var edx: UInt32
    public init(function: UInt32, index: UInt32 = 0, flags: UInt32 = 0, eax: UInt32 = 0, ebx: UInt32 = 0, ecx: UInt32 = 0, edx: UInt32 = 0) {
        self.function = function; self.index = index; self.flags = flags
        self.eax = eax; self.ebx = ebx; self.ecx = ecx; self.edx = edx
    }

    init(_ e: kvm_cpuid_entry2) {
        self.init(function: e.function, index: e.index, flags: e.flags, eax: e.eax, ebx: e.ebx, ecx: e.ecx, edx: e.edx)
    }

    var raw: kvm_cpuid_entry2 {
        var e = kvm_cpuid_entry2()
        e.function = function; e.index = index; e.flags = flags
        e.eax = eax; e.ebx = ebx; e.ecx = ecx; e.edx = edx
        return e
    }
}

/// A model-specific register and its value (`struct kvm_msr_entry`).
public struct MSREntry: Sendable, Hashable {
    public var index: UInt32
    public var value: UInt64
    public init(index: UInt32, value: UInt64) { self.index = index; self.value = value }
}

/// An optional KVM capability, queried with KVM_CHECK_EXTENSION.
public struct KVMCapability: RawRepresentable, Sendable, Hashable {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }
    /// The corresponding C constant is `KVM_CAP_IRQCHIP`.
    public static let irqchip = KVMCapability(rawValue: KVM_CAP_IRQCHIP)
    /// The corresponding C constant is `KVM_CAP_USER_MEMORY`.
    public static let userMemory = KVMCapability(rawValue: KVM_CAP_USER_MEMORY)
    /// The corresponding C constant is `KVM_CAP_SET_TSS_ADDR`.
    public static let setTSSAddress = KVMCapability(rawValue: KVM_CAP_SET_TSS_ADDR)
    /// The corresponding C constant is `KVM_CAP_EXT_CPUID`.
    public static let extendedCPUID = KVMCapability(rawValue: KVM_CAP_EXT_CPUID)
    /// The corresponding C constant is `KVM_CAP_PIT2`.
    public static let pit2 = KVMCapability(rawValue: KVM_CAP_PIT2)
    /// The corresponding C constant is `KVM_CAP_IRQFD`.
    public static let irqfd = KVMCapability(rawValue: KVM_CAP_IRQFD)
    /// The corresponding C constant is `KVM_CAP_IOEVENTFD`.
    public static let ioeventfd = KVMCapability(rawValue: KVM_CAP_IOEVENTFD)
    /// The corresponding C constant is `KVM_CAP_IMMEDIATE_EXIT`.
    public static let immediateExit = KVMCapability(rawValue: KVM_CAP_IMMEDIATE_EXIT)
    /// The corresponding C constant is `KVM_CAP_NR_MEMSLOTS`.
    public static let memorySlots = KVMCapability(rawValue: KVM_CAP_NR_MEMSLOTS)
    /// The corresponding C constant is `KVM_CAP_MAX_VCPUS`.
    public static let maxVCPUs = KVMCapability(rawValue: KVM_CAP_MAX_VCPUS)
}

/// An open /dev/kvm: the entry point that creates VMs and answers what the host supports.
public final class KVMSystem: Sendable {
    /// The only KVM API version that has ever shipped; anything else is not the API we speak.
    public static let expectedAPIVersion: Int32 = 12

    let fd: OwnedFD
    public let path: String
    public let apiVersion: Int32

    public init(path: String = "/dev/kvm") throws {
        let raw = open(path, O_RDWR | O_CLOEXEC)
        guard raw >= 0 else { throw KVMError.open(path, errno: errno) }
        fd = OwnedFD(raw)
        self.path = path
        apiVersion = try kvmIoctl(raw, CKVM_GET_API_VERSION, "KVM_GET_API_VERSION")
        guard apiVersion == Self.expectedAPIVersion else {
            throw MicroVMError(.unsupported, "\(path) speaks KVM API version \(apiVersion), not \(Self.expectedAPIVersion) — this kernel's KVM is not supported")
        }
    }

    /// 0 when unsupported; some capabilities return a count (e.g. memory slots).
    public func check(_ cap: KVMCapability) -> Int32 {
        (try? kvmIoctl(fd.raw, CKVM_CHECK_EXTENSION, "KVM_CHECK_EXTENSION", argument: UInt(cap.rawValue))) ?? 0
    }

    /// Bytes to mmap from each vCPU fd (the `kvm_run` page plus the PIO data pages).
    public func vcpuMmapSize() throws -> Int {
        Int(try kvmIoctl(fd.raw, CKVM_GET_VCPU_MMAP_SIZE, "KVM_GET_VCPU_MMAP_SIZE"))
    }

    /// The CPUID leaves KVM can present to a guest on this host.
    public func supportedCPUID() throws -> [CPUIDEntry] {
        var capacity = 128
        while true {
            let bytes = Int(CKVM_CPUID2_ENTRIES_OFFSET) + capacity * MemoryLayout<kvm_cpuid_entry2>.stride
            let buf = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 8)
            defer { buf.deallocate() }
            buf.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
            // SAFETY: buf is at least the header size; nent is its first field.
            buf.storeBytes(of: UInt32(capacity), as: UInt32.self)
            do {
                try kvmIoctl(fd.raw, CKVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID", argument: UInt(bitPattern: buf))
            } catch let e as MicroVMError where e.cause?.contains("errno \(E2BIG)") == true && capacity < 4096 {
                capacity *= 2
                continue
            }
            let n = min(Int(buf.load(as: UInt32.self)), capacity)
            // SAFETY: the kernel wrote n ≤ capacity entries after the header.
            let entries = (buf + Int(CKVM_CPUID2_ENTRIES_OFFSET)).bindMemory(to: kvm_cpuid_entry2.self, capacity: capacity)
            return (0..<n).map { CPUIDEntry(entries[$0]) }
        }
    }

    /// The MSRs KVM saves and restores for a vCPU (KVM_GET_MSR_INDEX_LIST).
    public func msrIndexList() throws -> [UInt32] {
        var capacity = 256
        while true {
            let bytes = Int(CKVM_MSR_LIST_INDICES_OFFSET) + capacity * 4
            let buf = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 8)
            defer { buf.deallocate() }
            // SAFETY: nmsrs is the first field of kvm_msr_list.
            buf.storeBytes(of: UInt32(capacity), as: UInt32.self)
            do {
                try kvmIoctl(fd.raw, CKVM_GET_MSR_INDEX_LIST, "KVM_GET_MSR_INDEX_LIST", argument: UInt(bitPattern: buf))
            } catch let e as MicroVMError where e.cause?.contains("errno \(E2BIG)") == true && capacity < 65536 {
                capacity = max(capacity * 2, Int(buf.load(as: UInt32.self)))
                continue
            }
            let n = min(Int(buf.load(as: UInt32.self)), capacity)
            // SAFETY: the kernel wrote n ≤ capacity indices after the header.
            let p = (buf + Int(CKVM_MSR_LIST_INDICES_OFFSET)).bindMemory(to: UInt32.self, capacity: capacity)
            return (0..<n).map { p[$0] }
        }
    }

    public func createVM() throws -> KVMVirtualMachine {
        let raw = try kvmIoctl(fd.raw, CKVM_CREATE_VM, "KVM_CREATE_VM")
        return KVMVirtualMachine(fd: OwnedFD(raw), system: self, runSize: try vcpuMmapSize())
    }
}
