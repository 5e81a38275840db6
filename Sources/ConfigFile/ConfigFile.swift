/// The configuration file: config/microvm.yaml (or MVM_CONFIG, or /etc/microvm/microvm.yaml)
/// read into `MicroVMConfig`. Apart from MicroVMCore because YAML decoding links Yams and all of
/// Foundation, which the VMM process (`mvm-vmm`) must not carry.
import Foundation
import MicroVMCore
import Yams

extension MicroVMConfig {
    /// Reads YAML; an unknown key, a bad size or a bad placement is an error naming the key.
    public static func parse(_ yaml: String, source: String = "config") throws -> MicroVMConfig {
        do {
            let cfg = try YAMLDecoder().decode(MicroVMConfig.self, from: yaml)
            try cfg.check(source: source)
            return cfg
        } catch let e as MicroVMError {
            throw e
        } catch let DecodingError.keyNotFound(key, ctx) {
            throw MicroVMError.invalidArgument("\(source): missing key '\((ctx.codingPath + [key]).map(\.stringValue).joined(separator: "."))'")
        } catch let DecodingError.typeMismatch(_, ctx), let DecodingError.valueNotFound(_, ctx), let DecodingError.dataCorrupted(ctx) {
            let path = ctx.codingPath.map(\.stringValue).joined(separator: ".")
            throw MicroVMError.invalidArgument("\(source): bad value at '\(path)': \(ctx.underlyingError.map { "\($0)" } ?? ctx.debugDescription)")
        } catch {
            throw MicroVMError(.invalidArgument, "\(source) is not valid YAML", cause: error)
        }
    }

    /// Loads MVM_CONFIG, else config/microvm.yaml from the source tree, else /etc/microvm/microvm.yaml.
    public static func load(path: String? = nil) throws -> MicroVMConfig {
        let env = ProcessInfo.processInfo.environment
        let candidates = [path, env["MVM_CONFIG"], Paths.sourceDirectory() + "/config/microvm.yaml", "/etc/microvm/microvm.yaml"].compactMap { $0 }
        for c in candidates where FileManager.default.fileExists(atPath: c) {
            let cache = ParsedConfigCache(file: c)
            if let cfg = cache.lookup() { return cfg }
            let cfg = try parse(try String(contentsOfFile: c, encoding: .utf8), source: c)
            cache.remember(cfg)
            return cfg
        }
        if let path { throw MicroVMError.notFound("config file '\(path)' does not exist") }
        return try parse(builtinDefault, source: "built-in config")
    }

}

/// The parsed configuration, kept as JSON beside the image cache while the YAML file is unchanged
/// (same inode, size and modification time): decoding YAML costs a launch milliseconds, JSON
/// a fraction of one. Best effort both ways: a cache that cannot be read or written costs a parse.
struct ParsedConfigCache {
    var file: String
    var path: String = Paths.default.cache + "/config-cache.json"

    struct Entry: Codable { var stamp: String; var config: MicroVMConfig }

    var stamp: String? { FileStamp.of(file) }

    func lookup() -> MicroVMConfig? {
        guard let stamp, let data = FileManager.default.contents(atPath: path),
              let e = try? JSONDecoder().decode(Entry.self, from: data), e.stamp == stamp else { return nil }
        return e.config
    }

    func remember(_ config: MicroVMConfig) {
        guard let stamp, FileManager.default.fileExists(atPath: (path as NSString).deletingLastPathComponent),
              let data = try? JSONEncoder().encode(Entry(stamp: stamp, config: config)) else { return }
        try? data.write(to: URL(fileURLWithPath: path), options: .atomic)
    }
}

