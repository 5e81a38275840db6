#if canImport(Glibc)
import CLinux
import Glibc
#endif

/// A detached POSIX thread that runs `body`, named `name` as the kernel shows it (its comm, at
/// most 15 bytes). Foundation's `Thread` would do the same, but links all of Foundation and its
/// ICU data into whatever uses it; the VMM process links none of that.
public enum NativeThread {
    private final class Body {
        let name: String
        let run: () -> Void
        init(_ name: String, _ run: @escaping () -> Void) { self.name = name; self.run = run }
    }

    /// Starts the thread (with `stackSize` bytes of stack, else the system's default); an error
    /// only when the system refuses it one (EAGAIN: out of threads).
    public static func detach(name: String, stackSize: Int? = nil, _ body: @escaping @Sendable () -> Void) throws(SystemCallError) {
        let box = Unmanaged.passRetained(Body(name, body))
        var thread = pthread_t()
        var attributes = pthread_attr_t()
        pthread_attr_init(&attributes)
        defer { pthread_attr_destroy(&attributes) }
        if let stackSize { pthread_attr_setstacksize(&attributes, stackSize) }
        let rc = pthread_create(&thread, &attributes, { context in
            let box = Unmanaged<Body>.fromOpaque(context!).takeRetainedValue()
            // From inside: a jailed VMM has no /proc to name its threads through.
            NativeThread.setName(box.name)
            box.run()
            return nil
        }, box.toOpaque())
        guard rc == 0 else {
            box.release()
            throw SystemCallError("pthread_create", errno: rc)
        }
        pthread_detach(thread)
    }

    /// Names the calling thread (cut to the kernel's 15 bytes).
    public static func setName(_ name: String) {
        _ = clinux_set_thread_name(name)
    }

    /// The calling thread's id (gettid: as /proc/PID/task lists it, and a cgroup's `tasks` takes).
    public static func currentID() -> Int32 { clinux_gettid() }

    /// How many threads this process runs, as /proc/self/task lists them (-1 without /proc).
    public static func count() -> Int {
        guard let dir = opendir("/proc/self/task") else { return -1 }
        defer { closedir(dir) }
        var n = 0
        while let e = readdir(dir) {
            if e.pointee.d_name.0 != CChar(UInt8(ascii: ".")) { n += 1 }
        }
        return n
    }

    /// The kernel's CPU mask size: cpu_set_t's 1024 bits.
    public static let affinityMaskBytes = 128

    /// Restricts thread `tid` (0: the calling thread) to `cpus`. Returns 0, or an errno: EINVAL
    /// for a CPU outside the mask's 0..<1024, else sched_setaffinity's.
    public static func setAffinity(thread tid: Int32 = 0, to cpus: [Int]) -> Int32 {
        guard cpus.allSatisfy({ $0 >= 0 && $0 < affinityMaskBytes * 8 }) else { return EINVAL }
        var mask = [UInt8](repeating: 0, count: affinityMaskBytes)
        for cpu in cpus { mask[cpu / 8] |= UInt8(1 << (cpu % 8)) }
        return mask.withUnsafeBytes { clinux_sched_setaffinity(tid, affinityMaskBytes, $0.baseAddress) } == 0 ? 0 : errno
    }
}

/// Moves the calling process into each cgroup directory of `dirs` (cgroup v1 hierarchies, or the
/// v2 tree's). Returns nil, or the directory whose write failed and its errno.
///
/// While the process has one thread, it writes 0 to a v1 hierarchy's `tasks`: that moves the one
/// thread, hence the whole process, and the kernel skips its threadgroup lock for a thread that
/// moves itself. `cgroup.procs` takes that lock, and taking it after a quiet spell waits out an
/// RCU grace period: joining four v1 hierarchies took 7 to 22 ms on a 2-CPU host, against
/// 0.2 ms through `tasks`. cgroup v2 has no `tasks` file, and a second thread would be left
/// behind, so both go through `cgroup.procs`.
public func joinCgroups(_ dirs: [String]) -> (dir: String, errno: Int32)? {
    let alone = !dirs.isEmpty && NativeThread.count() == 1
    for dir in dirs {
        var fd = alone ? open(dir + "/tasks", O_WRONLY | O_CLOEXEC) : -1
        if fd < 0 { fd = open(dir + "/cgroup.procs", O_WRONLY | O_CLOEXEC) }
        guard fd >= 0 else { return (dir, errno) }
        let written = write(fd, "0", 1)
        let failure = errno
        close(fd)
        guard written == 1 else { return (dir, failure) }
    }
    return nil
}

/// printf-style formatting through the C library (`"%.1f"`, `"%08x"`, `"%g"`), for code that
/// must not link Foundation's `String(format:)`.
public func cFormat(_ format: String, _ arguments: any CVarArg...) -> String {
    var size = 128
    while true {
        var buffer = [UInt8](repeating: 0, count: size)
        let needed = withVaList(arguments) { list in
            buffer.withUnsafeMutableBufferPointer { vsnprintf($0.baseAddress.map { UnsafeMutableRawPointer($0).assumingMemoryBound(to: CChar.self) }, size, format, list) }
        }
        guard needed >= 0 else { return format }
        if Int(needed) < size { return String(decoding: buffer.prefix(Int(needed)), as: UTF8.self) }
        size = Int(needed) + 1
    }
}

extension StringProtocol {
    /// The text without leading and trailing white space and line ends (Foundation's
    /// `trimmingCharacters(in: .whitespacesAndNewlines)`, without Foundation).
    public func trimmed() -> String {
        let isSpace: (Character) -> Bool = { $0.isWhitespace || $0.isNewline }
        guard let first = firstIndex(where: { !isSpace($0) }), let last = lastIndex(where: { !isSpace($0) }) else { return "" }
        return String(self[first...last])
    }
}

/// Writes `text` to standard error, whole and unbuffered (Foundation's
/// `FileHandle.standardError.write`, without Foundation).
public func writeStandardError(_ text: String) {
    var bytes = Array(text.utf8)[...]
    while !bytes.isEmpty {
        let n = bytes.withUnsafeBytes { write(STDERR_FILENO, $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { return }
        bytes = bytes.dropFirst(n)
    }
}

/// A file's whole content, read until the end of the file; nil if it cannot be opened or read.
///
/// Files under /proc and /sys report a size of 0 and hand their text out a page or so per
/// read(2). Foundation's readers (`String(contentsOfFile:)`, `FileManager.contents(atPath:)`)
/// stop after the first read on such a file: /proc/PID/smaps or /proc/self/mounts come back cut
/// after about 4 KiB. Read those with this.
public func readWholeFile(_ path: String) -> [UInt8]? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var out: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        if n < 0 { return nil }
        if n == 0 { return out }
        out += chunk[..<n]
    }
}

/// `readWholeFile` as UTF-8 text (invalid bytes replaced).
public func readWholeText(_ path: String) -> String? {
    readWholeFile(path).map { String(decoding: $0, as: UTF8.self) }
}

/// A lock with a condition to wait on (Foundation's `NSCondition`, on pthreads): `lock()`,
/// then `wait()` in a loop on the predicate, `broadcast()` under the lock, `unlock()`.
public final class PosixCondition: @unchecked Sendable {
    // SAFETY (Sendable): the mutex and condition are only touched through pthread calls, which
    // are thread-safe; they live at stable addresses allocated once and freed in deinit.
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    public init() {
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(condition, nil)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        condition.deallocate()
        mutex.deallocate()
    }

    public func lock() { pthread_mutex_lock(mutex) }
    public func unlock() { pthread_mutex_unlock(mutex) }
    /// Releases the lock until a broadcast (or a spurious wake-up), then holds it again.
    public func wait() { pthread_cond_wait(condition, mutex) }
    public func broadcast() { pthread_cond_broadcast(condition) }
}

/// This process's executable and libraries, as the kernel maps them.
public enum ExecutableImage {
    /// Unmaps the code and read-only data of the executable and its libraries from this
    /// process's page tables. Every page touched maps its neighbours too (the kernel's
    /// fault-around, 64 KiB), so code run once at start-up (decoding the configuration, loading
    /// the kernel, building the devices) leaves megabytes mapped that a running VM never touches
    /// again. The pages stay in the page cache:
    /// what still runs maps them back, a fault each. Returns the bytes advised; nil if refused.
    @discardableResult
    public static func dropResidentPages() -> Int? {
        let advised = clinux_drop_read_only_pages()
        return advised >= 0 ? advised : nil
    }
}
