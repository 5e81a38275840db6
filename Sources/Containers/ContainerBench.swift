import Foundation
import MicroVMCore
import Launch

/// Container start latency, measured side by side on one rootfs: a bare `runc run` of a bundle
/// holding the same config.json as the backend writes, against `ContainerBackend.run`, and
/// optionally the Docker path. The difference is what MicroVM's own bookkeeping costs.
public enum ContainerBench {
    public struct Samples: Codable, Sendable {
        public var label: String
        /// Seconds from launch to the command's first instruction (nil where not observable).
        public var start: [Double]
        /// Seconds from launch to the end of a `/bin/true` run, cleanup included.
        public var total: [Double]
        public var medianStart: Double? { Self.median(start) }
        public var medianTotal: Double? { Self.median(total) }
        static func median(_ v: [Double]) -> Double? {
            guard !v.isEmpty else { return nil }
            let s = v.sorted()
            return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
        }
    }

    public struct StartLatency: Codable, Sendable {
        public var iterations: Int
        public var bareRuntime: Samples
        public var backend: Samples
        public var docker: Samples?
        /// Median backend total minus median bare total, in milliseconds.
        public var overheadMilliseconds: Double? {
            guard let a = backend.medianTotal, let b = bareRuntime.medianTotal else { return nil }
            return (a - b) * 1000
        }
    }

    /// Runs `/bin/true` `iterations` times each way. `runtime` picks the OCI runtime for both the
    /// bare and the backend runs; `withDocker` adds the Docker path when its engine is running.
    public static func startLatency(iterations: Int, runtime: ContainerRuntime = .runc, rootfs: String,
                                    paths: Paths = .default, withDocker: Bool = false) async throws -> StartLatency {
        guard iterations >= 1 else { throw MicroVMError.invalidArgument("iterations must be at least 1") }
        let rt = try runtime.resolveOCI(profile: CachedProfile.get)
        let backend = ContainerBackend(runtime: runtime, paths: paths)
        _ = try backend.checkRootfs(rootfs)

        // The bare runs use a bundle with the config the backend would write, minus the wrapper.
        let scratch = paths.state + "/containers/bench-\(getpid())"
        try Paths.ensureDirectory(scratch + "/bundle")
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        let slice = ResourceSlice(cpus: 1, cpuQuota: 1, memory: .mebibytes(256))
        var bare = Samples(label: "\(rt.name) run (bare)", start: [], total: [])
        var ours = Samples(label: "ContainerBackend(\(rt.name))", start: [], total: [])
        for i in 0..<iterations {
            let id = "mvm-bench-bare-\(getpid())-\(i)"
            let config = try OCISpec.make(ContainerOptions(rootfs: rootfs, command: ["/bin/true"], hostname: "bench",
                                                           cgroupsPath: "/\(CgroupDirs.parent)/\(id)", enforcement: Enforcement(slice: slice, mode: .container)))
            try config.encoded().write(to: URL(fileURLWithPath: scratch + "/bundle/config.json"))
            let t0 = Date()
            let out = try ProcessRunner.run([rt.path, "--root", scratch + "/root", "run", "--bundle", scratch + "/bundle", id], timeout: 60)
            let dt = Date().timeIntervalSince(t0)
            CgroupDirs.remove(id: id)
            guard out.status == 0 else {
                throw MicroVMError(.backend, "bare \(rt.name) run failed (status \(out.status)): \(out.stderrText.suffix(500))")
            }
            bare.total.append(dt)

            let r = try await backend.run(VMSpec(name: "bench-\(getpid())-\(i)", command: ["/bin/true"], rootfs: rootfs, slice: slice, timeout: 60))
            guard r.exitStatus == 0 else { throw MicroVMError(.backend, "backend run of /bin/true exited \(r.exitStatus): \(r.output.suffix(500))") }
            if let b = r.bootSeconds { ours.start.append(b) }
            ours.total.append(r.totalSeconds)
        }
        var docker: Samples? = nil
        if withDocker {
            let d = ContainerBackend(runtime: .docker, paths: paths)
            var s = Samples(label: "docker run", start: [], total: [])
            for i in 0..<iterations {
                let r = try await d.run(VMSpec(name: "bench-docker-\(getpid())-\(i)", command: ["/bin/true"], rootfs: rootfs, slice: slice, timeout: 120))
                guard r.exitStatus == 0 else { throw MicroVMError(.backend, "docker run of /bin/true exited \(r.exitStatus): \(r.output.suffix(500))") }
                if let b = r.bootSeconds { s.start.append(b) }
                s.total.append(r.totalSeconds)
            }
            docker = s
        }
        return StartLatency(iterations: iterations, bareRuntime: bare, backend: ours, docker: docker)
    }
}

#if canImport(Glibc)
import Glibc
#endif
