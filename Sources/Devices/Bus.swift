/// Devices: the guest-visible devices of the direct VMM as pure state machines — a bus that
/// routes port-I/O and MMIO accesses, the 8250 UART, the i8042 reset line, the boot timer,
/// and the virtio-mmio transport with its devices. Side effects go through injected
/// `InterruptLine`s and output sinks, so tests drive every device without KVM.
///
/// ```swift
/// let bus = IOBus()
/// try bus.insert(uart, at: 0x3f8, length: 8)
/// bus.write(address: 0x3f8, data: [0x41])   // 'A' to the console
/// ```
import MicroVMCore
import Synchronization

/// A device on a bus. `offset` is relative to the device's base. Accesses are 1, 2, 4 or 8 bytes.
/// Implementations must accept any offset and size the guest sends: unknown registers read as
/// zero and ignore writes. Nothing a guest writes may trap.
public protocol BusDevice: AnyObject, Sendable {
    func read(offset: UInt64, data: UnsafeMutableRawBufferPointer)
    func write(offset: UInt64, data: UnsafeRawBufferPointer)
}

/// An interrupt the device raises: edge (`trigger`) or level (`set`).
public protocol InterruptLine: Sendable {
    func trigger()
    func set(level: Bool)
}

/// Routes accesses to the device whose range holds the address. Used for both the PIO and MMIO
/// spaces. Lookups are lock-free reads of an immutable snapshot, so the vCPU threads never block.
public final class IOBus: Sendable {
    public struct Range: Sendable {
        public let base: UInt64
        public let length: UInt64
        public let device: any BusDevice
    }

    private let ranges = Mutex<[Range]>([])
    /// Accesses that hit no device (a guest probing is normal; a flood is worth seeing).
    public let unhandled = Atomic<Int>(0)

    public init() {}

    /// Adds a device. Overlapping ranges are a VMM bug and are refused.
    public func insert(_ device: any BusDevice, at base: UInt64, length: UInt64) throws {
        guard length > 0, base.addingReportingOverflow(length).overflow == false else {
            throw MicroVMError.invalidArgument("bus range at 0x\(String(base, radix: 16)) has a bad length \(length)")
        }
        try ranges.withLock { list in
            for r in list where base < r.base + r.length && r.base < base + length {
                throw MicroVMError(.internalError, "bus range 0x\(String(base, radix: 16))+\(length) overlaps 0x\(String(r.base, radix: 16))+\(r.length)")
            }
            list.append(Range(base: base, length: length, device: device))
            list.sort { $0.base < $1.base }
        }
    }

    public func find(_ address: UInt64) -> (device: any BusDevice, offset: UInt64)? {
        ranges.withLock { list in
            for r in list where address >= r.base && address - r.base < r.length {
                return (r.device, address - r.base)
            }
            return nil
        }
    }

    /// Reads from the device at `address`; unclaimed addresses read as all ones, like an open bus.
    @discardableResult
    public func read(address: UInt64, data: UnsafeMutableRawBufferPointer) -> Bool {
        guard let (dev, off) = find(address) else {
            for i in 0..<data.count { data[i] = 0xff }
            unhandled.add(1, ordering: .relaxed)
            return false
        }
        dev.read(offset: off, data: data)
        return true
    }

    @discardableResult
    public func write(address: UInt64, data: UnsafeRawBufferPointer) -> Bool {
        guard let (dev, off) = find(address) else {
            unhandled.add(1, ordering: .relaxed)
            return false
        }
        dev.write(offset: off, data: data)
        return true
    }

    /// Convenience for tests and small callers.
    public func read(address: UInt64, count: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        out.withUnsafeMutableBytes { _ = read(address: address, data: $0) }
        return out
    }

    public func write(address: UInt64, bytes: [UInt8]) {
        bytes.withUnsafeBytes { _ = write(address: address, data: $0) }
    }
}
