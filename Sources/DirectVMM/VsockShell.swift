import CVhost
import Foundation
import MicroVMCore

/// One exchange with a shell listening on a guest's vsock port: write `input`, read until the
/// guest closes the connection (or `timeout` seconds pass), return what it wrote.
enum VsockShell {
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
