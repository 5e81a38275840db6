/// MicroVM: launch and manage VMs (our own KVM VMM, or QEMU through libvirt) and OCI containers
/// under one resource allocator, and measure what each isolation costs.
///
/// ```swift
/// import MicroVM
/// let result = try await DirectBackend().run(VMSpec(command: ["uname", "-r"]))
/// print(result.output, result.exitStatus)
/// ```
@_exported import MicroVMCore
@_exported import ConfigFile
@_exported import KVM
@_exported import GuestMemory
@_exported import LinuxBoot
@_exported import Devices
@_exported import VMM
@_exported import VMMAPI
@_exported import DirectVMM
@_exported import Jail
@_exported import Host
@_exported import Libvirt
@_exported import Containers
@_exported import Allocator
@_exported import Images
@_exported import Launch
@_exported import Rig
@_exported import Bench
