/// The bytes a port or MMIO write exit carries. Up to 8 (every MMIO access, every single `out`)
/// are held inline, so decoding the common exit allocates nothing; a longer `rep outs` goes to
/// the heap. It reads as a collection of bytes and compares by content, so exit handling stays
/// a pure function tested with literals (`data: [0x41]`).
public struct ExitBytes: Sendable, Hashable, RandomAccessCollection, ExpressibleByArrayLiteral, CustomStringConvertible {
    private var word: UInt64 = 0
    private var small = 0
    private var heap: [UInt8]?

    /// Copies `bytes`.
    public init(_ bytes: UnsafeRawBufferPointer) {
        if bytes.count <= 8 {
            small = bytes.count
            withUnsafeMutableBytes(of: &word) { $0.copyMemory(from: bytes) }
        } else {
            heap = Array(bytes)
        }
    }

    public init<S: Sequence>(_ bytes: S) where S.Element == UInt8 {
        let array = Array(bytes)
        self = array.withUnsafeBytes { ExitBytes($0) }
    }

    public init(arrayLiteral elements: UInt8...) { self.init(elements) }

    public var startIndex: Int { 0 }
    public var endIndex: Int { heap?.count ?? small }
    public subscript(i: Int) -> UInt8 {
        if let heap { return heap[i] }
        precondition(i >= 0 && i < small, "ExitBytes index \(i) out of range")
        return UInt8(truncatingIfNeeded: word.littleEndian >> (8 * UInt64(i)))
    }

    /// The bytes, in place.
    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        if let heap { return try heap.withUnsafeBytes(body) }
        var w = word
        return try Swift.withUnsafeBytes(of: &w) { try body(UnsafeRawBufferPointer(rebasing: $0[0..<small])) }
    }

    public static func == (a: ExitBytes, b: ExitBytes) -> Bool { a.elementsEqual(b) }
    public func hash(into h: inout Hasher) { for b in self { h.combine(b) } }
    public var description: String { Array(self).description }
}
