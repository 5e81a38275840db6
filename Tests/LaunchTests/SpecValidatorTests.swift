import Foundation
import Testing
@testable import Launch
import MicroVMCore

@Suite final class SpecValidatorTests {
    /// Each test's files, removed with it.
    let dir = NSTemporaryDirectory() + "mvm-validate-\(getpid())-\(UUID().uuidString.prefix(8))"
    deinit { try? FileManager.default.removeItem(atPath: dir) }

    func temp(_ name: String, _ bytes: [UInt8]) throws -> String {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let p = dir + "/" + name
        try Data(bytes).write(to: URL(fileURLWithPath: p))
        return p
    }

    @Test func aFileThatIsNotAKernelIsNamedSo() throws {
        let p = try temp("notakernel", Array("just text, no kernel here".utf8) + [UInt8](repeating: 0, count: 1024))
        let e = try #require(throws: MicroVMError.self) { try SpecValidator.validate(VMSpec(kernel: p, command: ["true"]), mode: .direct) }
        #expect(e.code == .invalidImage)
        #expect(e.message.contains("'\(p)' is not a kernel"))
    }

    @Test func bzImageAndELFHeadersPass() throws {
        var bz = [UInt8](repeating: 0, count: 0x300)
        bz.replaceSubrange(0x202..<0x206, with: Array("HdrS".utf8))
        try SpecValidator.checkKernel(try temp("bz", bz))
        try SpecValidator.checkKernel(try temp("elf", [0x7f, 0x45, 0x4c, 0x46] + [UInt8](repeating: 0, count: 64)))
    }

    @Test func missingDiskMalformedInputsAndTimeoutsAreNamed() throws {
        let missing = "/nonexistent/disk-\(getpid()).img"
        var e = try #require(throws: MicroVMError.self) {
            try SpecValidator.validate(VMSpec(disks: [DiskSpec(path: missing)], command: ["true"]), mode: .hosted)
        }
        #expect(e.message.contains(missing) && e.message.contains("does not exist"))
        e = try #require(throws: MicroVMError.self) { try SpecValidator.validate(VMSpec(command: ["true"], timeout: -1), mode: .container) }
        #expect(e.message.contains("--timeout -1"))
        e = try #require(throws: MicroVMError.self) { try SpecValidator.validate(VMSpec(command: ["true"], timeout: .nan), mode: .container) }
        #expect(e.message.contains("--timeout"))
        e = try #require(throws: MicroVMError.self) { try SpecValidator.validate(VMSpec(name: "../etc", command: ["true"]), mode: .container) }
        #expect(e.message.contains("instance name '../etc'"))
        e = try #require(throws: MicroVMError.self) { try SpecValidator.validate(VMSpec(command: []), mode: .container) }
        #expect(e.message.contains("needs a command"))
        e = try #require(throws: MicroVMError.self) { try SpecValidator.validate(VMSpec(vsockCID: 2, command: ["true"]), mode: .direct) }
        #expect(e.message.contains("--vsock 2 is reserved"))
        #expect(throws: MicroVMError.self) { try NetSpec(parsing: "tap,host=300.1.1.1") }
    }

    @Test func insideTheRigAHostTmpFileIsOutOfSightNotMissing() {
        #expect(SpecValidator.rigHint("/tmp/k/vmlinuz", inRig: true).contains("--share /tmp/k"))
        #expect(SpecValidator.rigHint("/tmp/k/vmlinuz", inRig: false).isEmpty)
        #expect(SpecValidator.rigHint("/work/vmlinuz", inRig: true).isEmpty)
    }

    /// `--max-cpus` is room for CPU hotplug, which only hosted VMs have; it holds at least `--cpus`.
    @Test func roomForMoreVCPUsIsForHostedVMsOnly() throws {
        var spec = VMSpec(cpus: 2, command: ["true"])
        spec.maxCPUs = 4
        for mode in [RunMode.direct, .container] {
            let e = try #require(throws: MicroVMError.self) { try SpecValidator.validate(spec, mode: mode) }
            #expect(e.message.contains("--max-cpus"), "\(mode): \(e.message)")
        }
        #expect(spec.initParameters.contains("\(GuestProtocol.cpuHotplugParameter)=1"))
        spec.maxCPUs = 1
        let e = try #require(throws: MicroVMError.self) { try spec.validateSizes() }
        #expect(e.message.contains("--max-cpus 1 must be between --cpus (2) and 255"))
        spec.maxCPUs = 2
        #expect(!spec.initParameters.contains { $0.hasPrefix(GuestProtocol.cpuHotplugParameter) }, "no room, no hotplug")
    }

    /// The command, environment and working directory travel on the guest kernel's command line:
    /// an environment that would overflow it is refused before anything is granted.
    @Test func anEnvironmentThatOverflowsTheKernelCommandLineIsRefused() throws {
        var spec = VMSpec(command: ["true"])
        spec.environment = ["PATH=/bin"]
        try SpecValidator.validate(spec, mode: .hosted)
        spec.environment = (0..<40).map { "VARIABLE_\($0)=" + String(repeating: "x", count: 40) }
        let e = try #require(throws: MicroVMError.self) { try SpecValidator.validate(spec, mode: .hosted) }
        #expect(e.message.contains("kernel's command line"), "\(e.message)")
        try SpecValidator.validate(spec, mode: .container)
    }
}
