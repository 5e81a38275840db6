import Foundation
import MicroVMCore

/// A host pseudo-terminal that carries a guest process's terminal (`process.terminal`, `ctr run
/// -t`, `docker run -t`, `mvm exec -t`): the guest agent gives the process a terminal of its
/// own in the guest, and the bytes between the two ends travel over vsock. The host's side is
/// therefore raw, so that echo, line editing and signals happen once, in the guest.
public enum Console {
    /// A new pseudo-terminal pair: the master, for whoever shows the terminal (containerd's
    /// shim, through the console socket), and the slave, raw, for the relay.
    public static func open() throws -> (master: Int32, slave: Int32) {
        // posix_openpt, unlockpt and ptsname, as Linux implements them (the C library hides
        // them from Swift): /dev/ptmx, then the ioctls TIOCSPTLCK and TIOCGPTN (_IOW/_IOR 'T'
        // 0x31 and 0x30 on an int).
        let master = Glibc.open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC)
        guard master >= 0 else { throw MicroVMError(.backend, "cannot open a pseudo-terminal (/dev/ptmx): \(String(cString: strerror(errno)))") }
        var unlock: CInt = 0
        var number: CInt = 0
        guard ioctl(master, 0x4004_5431, &unlock) == 0, ioctl(master, 0x8004_5430, &number) == 0 else {
            let why = String(cString: strerror(errno))
            close(master)
            throw MicroVMError(.backend, "cannot set up a pseudo-terminal: \(why)")
        }
        let slave = Glibc.open("/dev/pts/\(number)", O_RDWR | O_NOCTTY | O_CLOEXEC)
        guard slave >= 0 else {
            let why = String(cString: strerror(errno))
            close(master)
            throw MicroVMError(.backend, "cannot open the pseudo-terminal /dev/pts/\(number): \(why)")
        }
        makeRaw(slave)
        return (master, slave)
    }

    /// A new pair whose master has gone to the console socket at `path` (as runc sends a
    /// container's console): the slave, raw, for the relay.
    public static func open(sendingMasterTo path: String) throws -> Int32 {
        let (master, slave) = try open()
        defer { close(master) }
        do { try send(master, toSocket: path) } catch { close(slave); throw error }
        return slave
    }

    /// Puts the terminal on `fd` in raw mode; returns the settings it had, to put back.
    @discardableResult
    public static func makeRaw(_ fd: Int32) -> termios? {
        var saved = termios()
        guard tcgetattr(fd, &saved) == 0 else { return nil }
        var raw = saved
        cfmakeraw(&raw)
        tcsetattr(fd, TCSANOW, &raw)
        return saved
    }

    /// Puts back the settings `makeRaw` returned.
    public static func restore(_ fd: Int32, _ settings: termios?) {
        guard var settings else { return }
        tcsetattr(fd, TCSADRAIN, &settings)
    }

    /// The size of the terminal on `fd`, if it is one.
    public static func size(of fd: Int32) -> GuestAgent.Request.WindowSize? {
        var ws = winsize()
        guard ioctl(fd, UInt(TIOCGWINSZ), &ws) == 0 else { return nil }
        return .init(rows: ws.ws_row, columns: ws.ws_col)
    }

    /// Sends the master to the unix socket at `path`, as runc sends a container's console: one
    /// message whose data is a name and whose one SCM_RIGHTS descriptor is the master.
    public static func send(_ master: Int32, toSocket path: String) throws {
        let fd = try GuestAgent.connect(unixPath: path, what: "the console socket")
        defer { close(fd) }
        var name = Array("/dev/ptmx".utf8)
        // struct cmsghdr { size_t len; int level; int type; } then the descriptor, padded to 8.
        var control = [UInt8](repeating: 0, count: 24)
        control.withUnsafeMutableBytes { c in
            c.storeBytes(of: 20, toByteOffset: 0, as: Int.self)
            c.storeBytes(of: SOL_SOCKET, toByteOffset: 8, as: Int32.self)
            c.storeBytes(of: Int32(SCM_RIGHTS), toByteOffset: 12, as: Int32.self)
            c.storeBytes(of: master, toByteOffset: 16, as: Int32.self)
        }
        let sent = name.withUnsafeMutableBytes { data in
            control.withUnsafeMutableBytes { c in
                var iov = iovec(iov_base: data.baseAddress, iov_len: data.count)
                return withUnsafeMutablePointer(to: &iov) { iovp in
                    var msg = msghdr(msg_name: nil, msg_namelen: 0, msg_iov: iovp, msg_iovlen: 1,
                                     msg_control: c.baseAddress, msg_controllen: c.count, msg_flags: 0)
                    return sendmsg(fd, &msg, Int32(MSG_NOSIGNAL))
                }
            }
        }
        guard sent == name.count else {
            throw MicroVMError(.backend, "cannot send the console to \(path): \(String(cString: strerror(errno)))")
        }
    }
}
