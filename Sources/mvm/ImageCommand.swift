import ArgumentParser
import Foundation
import MicroVM

struct ImageCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "image",
        abstract: "Build, list and inspect guest images (kernel, initramfs, rootfs disk and tree).",
        subcommands: [Build.self, List.self, Inspect.self, Prune.self, MakeBusybox.self])

    struct MakeBusybox: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "make-busybox",
            abstract: "Write a one-layer busybox image tarball from the host's static busybox, for mvm run --image, docker load or ctr image import where no registry is reached.")
        @Argument(help: "The tarball to write.") var output: String
        @Option(help: "docker-save (docker load takes it) or oci (an OCI image layout).") var format: String = "docker-save"
        @Option(help: "The image's name in the tarball.") var tag: String = "busybox:latest"

        func run() async throws {
            try await reportingErrors {
                guard let f = BusyboxImage.Format(rawValue: format) else {
                    throw MicroVMError.invalidArgument("--format \(format) is not one of \(BusyboxImage.Format.allCases.map(\.rawValue).joined(separator: ", "))")
                }
                try BusyboxImage.make(at: output, format: f, tag: tag)
                print(output)
            }
        }
    }

    struct Build: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Build the default guest image, or return the cached one when its inputs are unchanged.")
        @Flag(help: "Rebuild even when a cached image matches the inputs.") var force = false
        @Flag(help: "Print the image as JSON.") var json = false

        func run() async throws {
            try await reportingErrors {
                let store = ImageStore()
                let started = Date()
                let image = force ? try store.build(force: true) : try store.ensureDefault()
                if json {
                    print(try ImageCommand.encode(BuildReport(image)))
                } else {
                    print("image \(image.key) ready in \(String(format: "%.2f", Date().timeIntervalSince(started))) s")
                    print("  kernel   \(image.kernel) (\(image.kernelVersion))")
                    print("  vmlinux  \(image.vmlinux) (PVH note: \(image.hasPVHNote ? "yes" : "no"))")
                    print("  initrd   \(image.initrd) (\(image.modules.count) modules)")
                    print("  disk     \(image.rootfsDisk)")
                    print("  tree     \(image.rootfsTree)")
                    print("  tarball  \(image.rootfsTarball)")
                }
            }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List cached guest images.")
        @Flag(help: "Print the list as JSON.") var json = false

        func run() async throws {
            try await reportingErrors {
                let images = ImageStore().list()
                if json { print(try ImageCommand.encode(images)); return }
                if images.isEmpty { print("no images yet: run 'mvm image build'"); return }
                for i in images {
                    let mib = Double(i.sizeBytes) / 1_048_576
                    print("\(i.isCurrent ? "*" : " ") \(i.key)  kernel \(i.kernelVersion)  \(i.moduleCount) modules  PVH \(i.hasPVHNote ? "yes" : "no")  \(String(format: "%.0f", mib)) MiB")
                }
            }
        }
    }

    struct Prune: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Delete cached images that the current kernel, recipes and packages no longer produce.")
        @Flag(help: "Also delete every unpacked and converted container image (mvm run --image makes them again on first use).") var containerImages = false

        func run() async throws {
            try await reportingErrors {
                let removed = try ImageStore().prune()
                print(removed.isEmpty ? "nothing to prune" : "removed \(removed.joined(separator: ", "))")
                if containerImages { print("removed \(try ContainerImageStore().removeAll()) container image(s)") }
            }
        }
    }

    struct Inspect: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Inspect a disk image read-only with libguestfs (boots an appliance: ~30 s under TCG).")
        @Argument(help: "The disk image file.") var disk: String
        @Flag(help: "Print the report as JSON.") var json = false

        func run() async throws {
            try await reportingErrors {
                let r = try ImageInspector.inspect(path: disk)
                if json { print(try ImageCommand.encode(r)); return }
                print("\(r.path): \(r.fileBytes) bytes")
                print("partitions: \(r.partitions.isEmpty ? "none" : r.partitions.joined(separator: " "))")
                for fs in r.filesystems {
                    print("filesystem \(fs.device): \(fs.type)\(fs.sizeBytes.map { ", \($0) bytes" } ?? "")\(fs.label.map { ", label \($0)" } ?? "")")
                }
                for os in r.operatingSystems {
                    print("os at \(os.root): \([os.type, os.distro, os.productName].compactMap { $0 }.joined(separator: " / "))")
                }
            }
        }
    }

    /// The image with its artifact paths spelled out, for scripts.
    struct BuildReport: Encodable {
        var key, directory, kernelVersion, kernel, vmlinux, initrd, rootfsDisk, rootfsTree, rootfsTarball: String
        var hasPVHNote: Bool
        var modules: [String]
        init(_ i: GuestImage) {
            key = i.key; directory = i.directory; kernelVersion = i.kernelVersion
            kernel = i.kernel; vmlinux = i.vmlinux; initrd = i.initrd
            rootfsDisk = i.rootfsDisk; rootfsTree = i.rootfsTree; rootfsTarball = i.rootfsTarball
            hasPVHNote = i.hasPVHNote
            modules = i.modules.map(\.name)
        }
    }

    static func encode(_ value: some Encodable) throws -> String {
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        enc.dateEncodingStrategy = .iso8601
        return String(decoding: try enc.encode(value), as: UTF8.self)
    }
}
