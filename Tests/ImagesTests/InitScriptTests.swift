import Foundation
import MicroVMCore
import Testing
@testable import Images

/// Runs the guest init's own shell functions under the host's busybox, so the framing the guest
/// prints is checked against the Swift parser without booting anything.
@Suite("guest init", .enabled(if: Fixture.haveBusybox, "busybox is not installed (apt-get install busybox-static)"))
struct InitScriptTests {
    func runInit(_ script: String) throws -> ProcessRunner.Output {
        try ProcessRunner.run(["busybox", "sh", "-c", ". \"$0\"; \(script)", Fixture.initScript],
                              environment: ["MVM_INIT_LIBRARY_ONLY": "1"], timeout: 30)
    }

    @Test(arguments: [
        (Data("hello\n".utf8), Int32(3)),
        (Data([0, 1, 2, 0xff, 0xfe, 10, 13, 0x40, 0x40]), Int32(0)),
        (Data((0..<1000).map { UInt8(truncatingIfNeeded: $0 &* 7) }), Int32(255)),
        (Data(), Int32(1)),
    ])
    func framingRoundTripsThroughConsoleParser(output: Data, status: Int32) throws {
        let dir = try Fixture.tempDir("frame")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try output.write(to: URL(fileURLWithPath: dir + "/out"))
        let r = try runInit("mvm_frame \(dir)/out \(status)")
        #expect(r.status == 0, "\(r.stderrText)")
        // The shell and the Swift twin must print the very same lines.
        #expect(r.stdoutText == GuestProtocol.frame(output: output, status: status))
        // Kernel noise and CRs between lines must not disturb the parser.
        let noisy = "[    1.0] virtio_blk virtio0: [vda]\r\n" + r.stdoutText.replacingOccurrences(of: "\n", with: "\r\n")
        let report = try #require(ConsoleParser.parse("@@mvm:boot-complete uptime=1.50@@\n" + noisy).report)
        #expect(report.status == status)
        #expect(report.output == output)
        #expect(report.bootUptime == 1.5)
    }

    @Test func forwardsModuleParametersFromTheCommandLine() throws {
        let r = try runInit("""
            MVM_CMDLINE='console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio-mmio.device=4K@0xd0001000:6 ext4.x=1 mvm.ro'; \
            echo "[$(mvm_module_args virtio_mmio | tr '\\n' ' ')]"; echo "[$(mvm_module_args ext4)]"; \
            echo "[$(mvm_module_args virtio_blk)]"; echo "[$(mvm_param mvm.ro)][$(mvm_param console)][$(mvm_param mvm.ip)]"
            """)
        #expect(r.stdoutText == "[device=4K@0xd0000000:5 device=4K@0xd0001000:6 ]\n[x=1]\n[]\n[1][ttyS0][]\n")
    }

    @Test func failureStillFramesAResult() throws {
        let dir = try Fixture.tempDir("fail")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // mvm_fail ends in a power-off; stub it so the test sees what the guest would print.
        let r = try runInit("MVM_WORK=\(dir); MVM_NEWROOT=\(dir)/none; mvm_poweroff() { exit 0; }; mvm_fail 125 'the root disk /dev/vda is not mountable'")
        let report = try #require(ConsoleParser.parse(r.stdoutText).report)
        #expect(report.status == 125)
        #expect(report.outputText.contains("not mountable"))
    }

    @Test func commandArgumentsSurviveTheNulEncoding() throws {
        let dir = try Fixture.tempDir("argv")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let argv = ["sh", "-c", "printf '<%s>' \"$@\"; exit 4", "x", "two words", "quote'd", "*"]
        let enc = GuestProtocol.encodeCommand(argv)
        let r = try runInit("""
            MVM_WORK=\(dir); MVM_CHROOT=0; MVM_STATUS_FILE=\(dir)/status; export MVM_STATUS_FILE; set -f; \
            printf '%s' '\(enc)' | base64 -d > \(dir)/argv; s=$(mvm_run_command \(dir)/argv \(dir)/out); mvm_frame \(dir)/out $s
            """)
        let report = try #require(ConsoleParser.parse(r.stdoutText).report)
        #expect(report.status == 4)
        #expect(report.outputText == "<two words><quote'd><*>")
    }

    /// `mvm.env` replaces the command's whole environment and `mvm.cwd` is where it starts (an
    /// image's Env and WorkingDir); a directory that is not there fails the command, not the init.
    @Test func theCommandGetsTheImagesEnvironmentAndDirectory() throws {
        let dir = try Fixture.tempDir("envcwd")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let env = GuestProtocol.encodeCommand(["PATH=/usr/bin:/bin", "GREETING=two words"])
        func run(cwd: String) throws -> GuestReport {
            let argv = GuestProtocol.encodeCommand(["sh", "-c", "echo \"$GREETING|$PATH|${HOME:-no home}|$(pwd)\""])
            let r = try runInit("""
                MVM_WORK=\(dir); MVM_CHROOT=0; MVM_STATUS_FILE=\(dir)/status; export MVM_STATUS_FILE; HOME=/root; export HOME; set -f; \
                MVM_CMDLINE='console=ttyS0 mvm.env=\(env) mvm.cwd=\(Data(cwd.utf8).base64EncodedString())'; \
                printf '%s' '\(argv)' | base64 -d > \(dir)/argv; s=$(mvm_run_command \(dir)/argv \(dir)/out); mvm_frame \(dir)/out $s
                """)
            return try #require(ConsoleParser.parse(r.stdoutText).report, "\(r.stdoutText)\(r.stderrText)")
        }
        let ok = try run(cwd: dir)
        #expect(ok.status == 0)
        #expect(ok.outputText == "two words|/usr/bin:/bin|no home|\(dir)\n")
        let missing = try run(cwd: dir + "/nowhere")
        #expect(missing.status == 126 && missing.outputText.contains("nowhere"), "\(missing.outputText)")
    }
}
