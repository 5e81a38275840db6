import CVhost
import Foundation
import MicroVMCore

/// The guest init's vsock shell (`mvm run --vsock CID --vsock-shell`), reached over the host's
/// vhost-vsock, the same for every VM mode: how `mvm exec` runs a command in a VM.
public enum GuestAgent {
    /// Runs `command` in the guest: its combined output and its exit status.
    public static func exec(cid: UInt32, command: [String], timeout: Int = 3600) async throws -> (status: Int32, output: String) {
        let marker = "@@mvm-exec-status="
        let script = command.map(ProcessRunner.shellQuote).joined(separator: " ") + " 2>&1; echo \"\(marker)$?\"; exit\n"
        let reply = try await Task.detached { try run(cid: cid, port: GuestProtocol.vsockShellPort, input: script, timeout: timeout) }.value
        guard let at = reply.range(of: marker, options: .backwards),
              let status = Int32(reply[at.upperBound...].prefix { $0.isNumber }) else {
            throw MicroVMError(.guestError, "the guest's shell on vsock \(cid):\(GuestProtocol.vsockShellPort) gave no status: \(reply.suffix(300))")
        }
        return (status, String(reply[..<at.lowerBound]))
    }

    /// One exchange with a shell listening on a guest's vsock port: write `input`, read until the
    /// guest closes the connection (or `timeout` seconds pass), return what it wrote.
    static func run(cid: UInt32, port: UInt32, input: String, timeout: Int) throws -> String {
        let fd = socket(Int32(CVHOST_AF_VSOCK), Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else {
            throw MicroVMError(.unsupported, "cannot open a vsock socket (\(String(cString: strerror(errno)))): load vhost_vsock (modprobe vhost_vsock)")
        }
        defer { close(fd) }
        var tv = timeval(tv_sec: timeout, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_vm()
        addr.svm_family = sa_family_t(CVHOST_AF_VSOCK)
        addr.svm_cid = cid
        addr.svm_port = port
        let ok = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_vm>.size)) }
        }
        guard ok == 0 else {
            throw MicroVMError(.backend, "cannot reach the guest's shell at vsock \(cid):\(port): \(String(cString: strerror(errno))) (is the guest up, and was it started with --vsock-shell?)")
        }
        let bytes = Array(input.utf8)
        guard bytes.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) == bytes.count else {
            throw MicroVMError(.backend, "cannot send the command to vsock \(cid):\(port): \(String(cString: strerror(errno)))")
        }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 16384)
        while out.count < 64 << 20 {
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            out += buf[0..<n]
        }
        return String(decoding: out, as: UTF8.self)
    }
}
