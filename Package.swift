// swift-tools-version: 6.1
import PackageDescription

let strict: [SwiftSetting] = [.enableUpcomingFeature("ExistentialAny")]

let package = Package(
    name: "MicroVM",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "MicroVM", targets: ["MicroVM"]),
        .executable(name: "mvm", targets: ["mvm"]),
        .executable(name: "mvm-kvm-probe", targets: ["mvm-kvm-probe"]),
        .executable(name: "mvm-vmm", targets: ["mvm-vmm"]),
        .executable(name: "mvm-kvm-floor", targets: ["mvm-kvm-floor"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/groue/GRDB.swift", from: "7.10.0"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
        .package(url: "https://github.com/x-sheep/swift-property-based", from: "2.0.1"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
    ],
    targets: [
        // C only: KVM ioctl numbers and struct helpers.
        .target(name: "CKVM"),
        // C only: vhost ioctl numbers and vsock socket addresses.
        .target(name: "CVhost"),
        // C only: the Linux calls the Swift Glibc module leaves out (eventfd, timerfd, pidfd_open…).
        .target(name: "CLinux"),
        // Headers only: the libraries are loaded on first use (CLazyLibs), not linked.
        .systemLibrary(name: "CLibvirt", providers: [.apt(["libvirt-dev"])]),
        .systemLibrary(name: "CGuestfs", providers: [.apt(["libguestfs-dev"])]),
        // C only: pivot_root, prctl and libseccomp for the VMM's jail.
        .target(name: "CJail", linkerSettings: [.linkedLibrary("seccomp")]),
        // C only: trampolines that load libvirt and libguestfs when first called.
        .target(name: "CLazyLibs", linkerSettings: [.linkedLibrary("dl")]),

        // Foundation-free (FoundationEssentials at most): the VMM process links it.
        .target(name: "MicroVMCore", dependencies: ["CLinux"], swiftSettings: strict),
        // The YAML configuration file: Yams, hence all of Foundation, kept out of MicroVMCore.
        .target(name: "ConfigFile", dependencies: ["MicroVMCore", "Yams"], swiftSettings: strict),
        .target(name: "KVM", dependencies: ["CKVM", "MicroVMCore"], swiftSettings: strict),
        .target(name: "GuestMemory", dependencies: ["MicroVMCore"], swiftSettings: strict),
        .target(name: "LinuxBoot", dependencies: ["GuestMemory", "MicroVMCore"], swiftSettings: strict),
        .target(name: "Devices", dependencies: ["VMMAPI", "GuestMemory", "MicroVMCore", "CVhost"], swiftSettings: strict),
        // The machine itself: KVM, guest memory, devices, boot. What `mvm-vmm` links, and nothing else.
        .target(name: "VMM", dependencies: ["KVM", "GuestMemory", "LinuxBoot", "Devices", "MicroVMCore", "CKVM", "VMMAPI"], swiftSettings: strict),
        .target(name: "DirectVMM", dependencies: ["VMM", "VMMAPI", "Jail", "CVhost", "KVM", "GuestMemory", "LinuxBoot", "Devices", "MicroVMCore", "CKVM", "Host", "Images", "Allocator", "Launch"], swiftSettings: strict),
        // The VMM's jail: namespaces, an empty root, no privileges, a seccomp allow-list per thread kind.
        .target(name: "Jail", dependencies: ["CJail", "CKVM", "CVhost", "MicroVMCore"], swiftSettings: strict),
        // The micro-VM's Firecracker-compatible configuration and control API (no KVM, no Foundation networking).
        .target(name: "VMMAPI", dependencies: ["MicroVMCore"], swiftSettings: strict),
        .target(name: "Host", dependencies: ["MicroVMCore", "KVM", "CVhost"], swiftSettings: strict),
        .target(name: "Libvirt", dependencies: ["CLibvirt", "CLazyLibs", "MicroVMCore", "Host", "Images", "Launch", "VMMAPI", "Allocator"], swiftSettings: strict),
        .target(name: "Containers", dependencies: ["MicroVMCore", "Host", "Allocator", "Launch"], swiftSettings: strict),
        .target(name: "Allocator", dependencies: ["MicroVMCore", "Host", .product(name: "GRDB", package: "GRDB.swift")], swiftSettings: strict),
        .target(name: "Images", dependencies: ["MicroVMCore", "Host", "CGuestfs", "CLazyLibs", .product(name: "Crypto", package: "swift-crypto")], swiftSettings: strict),
        .target(name: "Launch", dependencies: ["MicroVMCore", "Host", "Images", "Allocator", "VMMAPI"], swiftSettings: strict),
        .target(name: "Rig", dependencies: ["MicroVMCore", "Host", "Images"], swiftSettings: strict),
        .target(name: "Bench", dependencies: ["MicroVMCore", "Host", "Images", "Allocator", "Launch", "Containers", "Libvirt", "DirectVMM", "VMM", "VMMAPI"], swiftSettings: strict),
        .target(name: "MicroVM", dependencies: ["MicroVMCore", "ConfigFile", "KVM", "GuestMemory", "LinuxBoot", "Devices", "VMM", "VMMAPI", "DirectVMM", "Jail", "Host", "Libvirt", "Containers", "Allocator", "Images", "Launch", "Rig", "Bench"], swiftSettings: strict),
        .executableTarget(name: "VirtioFuzz", dependencies: ["Devices", "MicroVMCore", "VMMAPI"], swiftSettings: strict),
        .executableTarget(name: "mvm", dependencies: ["MicroVM", .product(name: "ArgumentParser", package: "swift-argument-parser")], swiftSettings: strict),

        .executableTarget(name: "mvm-kvm-probe", dependencies: ["KVM"], swiftSettings: strict),
        // C only: the fewest KVM calls that run a tiny guest, the floor `mvm bench --scenarios vmm` compares the VMMs with.
        .executableTarget(name: "mvm-kvm-floor"),
        // One micro-VM per process: the VMM, its API and the per-boot KVM verdict, nothing else.
        // -lstdc++, -lgcc_s and -lseccomp find linker scripts in static-libs first, which name the
        // archives: a VMM loads only the C library and libm before main.
        .executableTarget(name: "mvm-vmm", dependencies: ["VMM", "VMMAPI", "Devices", "KVM", "MicroVMCore", "Jail"], exclude: ["static-libs"],
                          swiftSettings: strict, linkerSettings: [.unsafeFlags(["-L", Context.packageDirectory + "/Sources/mvm-vmm/static-libs"])]),

        .testTarget(name: "MicroVMCoreTests", dependencies: ["ConfigFile", "MicroVMCore", "GuestMemory"]),
        .testTarget(name: "KVMTests", dependencies: ["KVM", "MicroVMCore", "GuestMemory"]),
        .testTarget(name: "GuestMemoryTests", dependencies: ["GuestMemory", "MicroVMCore"]),
        .testTarget(name: "LinuxBootTests", dependencies: ["LinuxBoot", "GuestMemory", "MicroVMCore"]),
        .testTarget(name: "DevicesTests", dependencies: ["Devices", "GuestMemory", "MicroVMCore", .product(name: "PropertyBased", package: "swift-property-based")]),
        .testTarget(name: "DirectVMMTests", dependencies: ["DirectVMM", "VMM", "VMMAPI", "Jail", "Launch", "Allocator", "KVM", "Host", "MicroVMCore", "GuestMemory"]),
        .testTarget(name: "HostTests", dependencies: ["Host", "MicroVMCore", "GuestMemory"]),
        .testTarget(name: "LibvirtTests", dependencies: ["ConfigFile", "Libvirt", "Host", "Images", "MicroVMCore", "GuestMemory"]),
        .testTarget(name: "ContainersTests", dependencies: ["ConfigFile", "Containers", "Allocator", "Host", "Images", "MicroVMCore", "GuestMemory"]),
        .testTarget(name: "AllocatorTests", dependencies: ["ConfigFile", "Allocator", "Host", .product(name: "PropertyBased", package: "swift-property-based"), "MicroVMCore", "GuestMemory"]),
        .testTarget(name: "ImagesTests", dependencies: ["Images", "Host", "MicroVMCore", "GuestMemory"]),
        .testTarget(name: "RigTests", dependencies: ["Rig", "Host", "Images", "MicroVMCore", "GuestMemory"]),
        .testTarget(name: "BenchTests", dependencies: ["ConfigFile", "Bench", "MicroVMCore", "GuestMemory"]),
        .testTarget(name: "LaunchTests", dependencies: ["ConfigFile", "Launch", "Allocator", "Containers", "Libvirt", "DirectVMM", "VMM", "MicroVMCore", "Images", "Host"]),
        .testTarget(name: "VMMAPITests", dependencies: ["VMMAPI", "MicroVMCore", "Yams"]),
        .testTarget(name: "CLITests", dependencies: ["MicroVM", "MicroVMCore", "GuestMemory"]),
    ]
)
