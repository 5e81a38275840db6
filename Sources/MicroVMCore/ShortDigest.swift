/// FNV-1a over a string's UTF-8, as 16 hex digits: a short, stable name for something (a Docker
/// image tag for a rootfs, a VM name for a long container id). Not for anything secret.
public func shortDigest(_ text: String) -> String {
    var h: UInt64 = 0xcbf2_9ce4_8422_2325
    for b in text.utf8 { h = (h ^ UInt64(b)) &* 0x0000_0100_0000_01b3 }
    let hex = String(h, radix: 16)
    return String(repeating: "0", count: 16 - hex.count) + hex
}
