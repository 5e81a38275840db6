import MicroVMCore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The MC146818 real-time clock and CMOS RAM at ports 0x70 (index) / 0x71 (data), showing the
/// host's UTC time. Without it Linux's CMOS reads see an open bus (0xff): "update in
/// progress" for ever, a 20 ms wait per read during boot and a failed rtc_cmos probe.
///
/// Insert at 0x70 with length 2. Reads of the time registers compute the time on demand, so
/// the update-in-progress bit is always clear. Guest writes to the clock are ignored (the
/// host owns the time); the other CMOS bytes are plain storage.
public final class CMOSClock: BusDevice {
    public enum Register {
        public static let seconds: UInt8 = 0x00
        public static let minutes: UInt8 = 0x02
        public static let hours: UInt8 = 0x04
        public static let weekday: UInt8 = 0x06
        public static let day: UInt8 = 0x07
        public static let month: UInt8 = 0x08
        public static let year: UInt8 = 0x09
        public static let statusA: UInt8 = 0x0a
        public static let statusB: UInt8 = 0x0b
        public static let statusC: UInt8 = 0x0c
        public static let statusD: UInt8 = 0x0d
        /// IBM PC century byte, read by Linux when the FADT names none.
        public static let century: UInt8 = 0x32
    }
    public static let length: UInt64 = 2

    struct State {
        var index: UInt8 = 0
        var ram = [UInt8](repeating: 0, count: 128)
        init() {
            ram[Int(Register.statusA)] = 0x26  // 32.768 kHz time base, 1024 Hz periodic rate
            ram[Int(Register.statusB)] = 0x02  // 24-hour, BCD
            ram[Int(Register.statusD)] = 0x80  // valid RAM and time (battery good)
        }
    }

    private let state = Mutex(State())
    private let now: @Sendable () -> Int64

    /// - Parameter now: seconds since the Unix epoch (UTC); tests pass a fixed clock.
    public init(now: @escaping @Sendable () -> Int64 = { Int64(time(nil)) }) {
        self.now = now
    }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        for i in 0..<data.count { data[i] = 0 }
        guard data.count > 0 else { return }
        switch offset {
        case 0:
            data[0] = state.withLock { $0.index }
        case 1:
            let index = state.withLock { $0.index }
            data[0] = isClock(index) ? clockByte(index) : state.withLock { s in
                let v = s.ram[Int(index)]
                if index == Register.statusC { s.ram[Int(index)] = 0 }  // reading C acknowledges
                return v
            }
        default:
            break
        }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        guard data.count > 0 else { return }
        let v = data[0]
        state.withLock { s in
            switch offset {
            case 0:
                s.index = v & 0x7f  // bit 7 is the NMI mask, not part of the index
            case 1:
                switch s.index {
                case Register.statusA: s.ram[Int(s.index)] = v & 0x7f  // UIP is read-only
                case Register.statusB: s.ram[Int(s.index)] = v
                case Register.statusC, Register.statusD: break  // read-only
                case let i where isClock(i): break
                case let i: s.ram[Int(i)] = v
                }
            default:
                break
            }
        }
    }

    private func isClock(_ index: UInt8) -> Bool {
        switch index {
        case Register.seconds, Register.minutes, Register.hours, Register.weekday, Register.day,
             Register.month, Register.year, Register.century:
            return true
        default:
            return false
        }
    }

    /// One time register in the format status B asks for (BCD or binary, 12 or 24 hours).
    private func clockByte(_ index: UInt8) -> UInt8 {
        let statusB = state.withLock { $0.ram[Int(Register.statusB)] }
        var t = time_t(now())
        var tm = tm()
        guard gmtime_r(&t, &tm) != nil else { return 0 }
        let binary = statusB & 0x04 != 0
        func enc(_ n: Int32) -> UInt8 {
            let n = UInt8(clamping: max(0, n))
            return binary ? n : (n / 10) << 4 | n % 10
        }
        switch index {
        case Register.seconds: return enc(min(tm.tm_sec, 59))
        case Register.minutes: return enc(tm.tm_min)
        case Register.hours:
            if statusB & 0x02 != 0 { return enc(tm.tm_hour) }
            let h12 = tm.tm_hour % 12 == 0 ? 12 : tm.tm_hour % 12
            return enc(h12) | (tm.tm_hour >= 12 ? 0x80 : 0)
        case Register.weekday: return enc(tm.tm_wday + 1)
        case Register.day: return enc(tm.tm_mday)
        case Register.month: return enc(tm.tm_mon + 1)
        case Register.year: return enc((tm.tm_year + 1900) % 100)
        case Register.century: return enc((tm.tm_year + 1900) / 100)
        default: return 0
        }
    }
}
