/// KVM: typed handles over the Linux KVM API — the system (/dev/kvm), a VM and its vCPUs —
/// that own their file descriptors and the mmapped `kvm_run` page and release them when dropped.
/// Every ioctl goes through one internal function that turns errno into a `MicroVMError` saying
/// what to do. Also home of the functional probe that tells hardware KVM from a software one.
///
/// ```swift
/// let kvm = try KVMSystem()
/// let vm = try kvm.createVM()
/// try vm.setUserMemoryRegion(slot: 0, guestAddress: 0, size: ram.size.bytes, host: ram.regions[0].host)
/// let vcpu = try vm.createVCPU(id: 0)
/// switch try vcpu.run() {
/// case .portOut(let port, _, _, let data): print("out \(port): \(data)")
/// case .halt: break
/// default: break
/// }
/// ```
import CKVM
import MicroVMCore
#if canImport(Glibc)
import Glibc
#endif

/// A file descriptor owned by exactly one handle and closed with it.
final class OwnedFD: @unchecked Sendable {
    // SAFETY (Sendable): the descriptor number is immutable; the kernel serialises use of the fd.
    let raw: Int32
    init(_ raw: Int32) { self.raw = raw }
    deinit { close(raw) }
}

/// The one place an ioctl is issued. `argument` is either a value or a pointer's bit pattern,
/// passed through in full 64 bits (the CInt overload would truncate values such as 0xfffbd000).
@discardableResult
func kvmIoctl(_ fd: Int32, _ request: UInt, _ name: String, argument: UInt = 0) throws -> Int32 {
    while true {
        let r: Int32
        if argument == 0 {
            r = ioctl(fd, request, CInt(0))
        } else {
            // SAFETY: a non-zero bit pattern always forms a pointer value; the kernel reads it as
            // either an integer or an address we own for the duration of the call.
            r = ioctl(fd, request, UnsafeMutableRawPointer(bitPattern: argument)!)
        }
        if r >= 0 { return r }
        let e = errno
        if e == EINTR && request != CKVM_RUN { continue }
        throw KVMError.ioctl(name, errno: e)
    }
}

/// Calls `body` with the address of `value` as an ioctl argument.
@discardableResult
func kvmIoctl<T>(_ fd: Int32, _ request: UInt, _ name: String, _ value: inout T) throws -> Int32 {
    try withUnsafeMutablePointer(to: &value) {
        // SAFETY: the pointer is valid for the duration of the synchronous ioctl.
        try kvmIoctl(fd, request, name, argument: UInt(bitPattern: $0))
    }
}

/// Turns KVM errors into `MicroVMError`s whose message says what to do next.
public enum KVMError {
    static func ioctl(_ name: String, errno e: Int32) -> MicroVMError {
        let cause = SystemCallError(name, errno: e)
        switch e {
        case EPERM, EACCES:
            return MicroVMError(.permissionDenied, "\(name): permission denied — add the user to the kvm group or run as root", cause: cause)
        case ENOMEM:
            return MicroVMError(.insufficientResources, "\(name): the kernel is out of memory for KVM — free memory or give the VM less", cause: cause)
        case EEXIST:
            return MicroVMError(.hypervisor, "\(name): already exists — a VMM bug (created twice)", cause: cause)
        default:
            return MicroVMError(.hypervisor, "KVM \(name) failed: \(String(cString: strerror(e))) — check `dmesg` for kvm messages", cause: cause)
        }
    }

    static func open(_ path: String, errno e: Int32) -> MicroVMError {
        let cause = SystemCallError("open(\(path))", errno: e)
        switch e {
        case ENOENT, ENXIO, ENODEV:
            return MicroVMError(.unsupported, "\(path) does not exist — load kvm_intel or kvm_amd (modprobe kvm_intel / kvm_amd) and enable virtualization in the firmware", cause: cause)
        case EACCES, EPERM:
            return MicroVMError(.permissionDenied, "\(path): permission denied — add the user to the kvm group or run as root", cause: cause)
        default:
            return MicroVMError(.hypervisor, "cannot open \(path): \(String(cString: strerror(e)))", cause: cause)
        }
    }
}
