import Foundation
import MicroVMCore
import Testing

struct JSONTests {
    func parse(_ text: String) throws(JSONSyntaxError) -> JSONValue { try JSONValue(parsing: Array(text.utf8)) }

    @Test func parsesEveryKindOfValue() throws {
        let v = try parse(#" {"a": [1, -2.5e2, 0, true, false, null], "b": {"c": "x\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00"}, "": {}} "#)
        #expect(v == .object(["a": .array([.number(1), .number(-250), .number(0), .bool(true), .bool(false), .null]),
                              "b": .object(["c": .string("x\"\\/\u{8}\u{c}\n\r\t\u{e9}\u{1F600}")]), "": .object([:])]))
        #expect(try parse("[]") == .array([]) && (try parse("\"\"")) == .string("") && (try parse("9007199254740992")) == .number(9_007_199_254_740_992))
        #expect(try parse("\"caf\u{e9} \u{1F600}\"") == .string("caf\u{e9} \u{1F600}"))
    }

    /// What is not JSON is refused, with the problem and its place named.
    @Test(arguments: [
        ("", "unexpected end"), ("[1,]", "unexpected character"), ("{\"a\":1,}", "expected a key"), ("01", "leading zero"),
        ("1.", "no digit after"), ("-", "invalid number"), ("+1", "unexpected character"), ("1e", "no digit in the exponent"),
        ("\"abc", "unterminated string"), ("\"a\u{1}b\"", "control character"), (#""\x""#, "invalid escape"), (#""\ud800""#, "unpaired surrogate"),
        (#""\ud800\u0041""#, "unpaired surrogate"), (#""\u12""#, "incomplete \u{5C}u escape"), (#""\u12G4""#, "invalid \u{5C}u escape"), ("{\"a\":1,\"a\":2}", "duplicate key \"a\""), ("[] []", "after the value"),
        ("1e400", "out of range"), ("NaN", "unexpected character"), ("tru", "invalid literal"), ("{\"a\" 1}", "expected ':'"), ("[1 2]", "expected ','"),
    ])
    func refusesWhatIsNotJSON(text: String, problem: String) {
        #expect {
            try parse(text)
        } throws: { error in
            "\(error)".contains(problem)
        }
    }

    @Test func refusesInvalidUTF8AndDeepNesting() throws {
        #expect(throws: JSONSyntaxError.self) { try JSONValue(parsing: [0x22, 0xFF, 0x22]) }
        let deep = String(repeating: "[", count: JSONValue.maxDepth) + String(repeating: "]", count: JSONValue.maxDepth)
        #expect(try parse(deep) != .null)
        #expect(throws: JSONSyntaxError.self) { try parse("[" + deep + "]") }
        // A hostile body of a million brackets is refused at the limit, without deep recursion.
        #expect(throws: JSONSyntaxError.self) { try parse(String(repeating: "[", count: 1_000_000)) }
    }

    /// Random documents written by Foundation's serializer read back as the values they were made from.
    @Test func readsWhatFoundationWrites() throws {
        var rng = SeededGenerator(seed: 0x5EED)
        for _ in 0..<300 {
            let (value, object) = randomValue(&rng, depth: 0)
            let data = try JSONSerialization.data(withJSONObject: [object], options: [.fragmentsAllowed])
            #expect(try JSONValue(parsing: data) == .array([value]), "\(String(decoding: data, as: UTF8.self))")
        }
    }

    /// Mangled documents never crash the parser: each is read or refused.
    @Test func mangledDocumentsAreReadOrRefused() throws {
        var rng = SeededGenerator(seed: 42)
        let seed = Array(#"{"machine-config": {"vcpu_count": 2, "mem_size_mib": 1024}, "drives": [{"drive_id": "r\u00e9", "x": [1.5e3, null, true]}]}"#.utf8)
        let pieces = Array(#"{}[]",:\-0e."#.utf8)
        var refused = 0
        for _ in 0..<20_000 {
            var doc = seed
            for _ in 0..<Int(rng.next() % 4 + 1) {
                let i = Int(rng.next() % UInt64(doc.count))
                switch rng.next() % 3 {
                case 0: doc[i] = UInt8(truncatingIfNeeded: rng.next())
                case 1: doc.remove(at: i)
                default: doc.insert(pieces[Int(rng.next() % UInt64(pieces.count))], at: i)
                }
            }
            if (try? JSONValue(parsing: doc)) == nil { refused += 1 }
        }
        #expect(refused > 10_000)
    }

    func randomValue(_ rng: inout SeededGenerator, depth: Int) -> (JSONValue, Any) {
        switch rng.next() % (depth > 3 ? 4 : 6) {
        case 0: return (.null, NSNull())
        case 1: let b = rng.next() % 2 == 0; return (.bool(b), b)
        case 2:
            let n = Double(Int64(bitPattern: rng.next()) >> 12) / 4
            return (.number(n), n)
        case 3:
            var s = ""
            for _ in 0..<Int(rng.next() % 12) {
                let pick = rng.next() % 4
                let scalar: UInt32 = pick == 0 ? UInt32(rng.next() % 0x80) : pick == 1 ? 0x20 + UInt32(rng.next() % 0x60) : pick == 2 ? 0xA0 + UInt32(rng.next() % 0xD700) : 0x10000 + UInt32(rng.next() % 0xFFFF)
                s.unicodeScalars.append(Unicode.Scalar(scalar) ?? "?")
            }
            return (.string(s), s)
        case 4:
            var values: [JSONValue] = [], objects: [Any] = []
            for _ in 0..<Int(rng.next() % 5) {
                let (v, o) = randomValue(&rng, depth: depth + 1)
                values.append(v); objects.append(o)
            }
            return (.array(values), objects)
        default:
            var values: [String: JSONValue] = [:], objects: [String: Any] = [:]
            for i in 0..<Int(rng.next() % 5) {
                let (v, o) = randomValue(&rng, depth: depth + 1)
                values["k\(i)\u{e9}"] = v; objects["k\(i)\u{e9}"] = o
            }
            return (.object(values), objects)
        }
    }
}
