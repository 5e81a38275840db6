import Foundation
import MicroVMCore

/// Checks a whole spec before anything is allocated, probed or created: each problem is named
/// with the input that has it and what to do instead. Nothing here touches the host's state.
public enum SpecValidator {
    public static func validate(_ spec: VMSpec, mode: RunMode) throws {
        try validateName(spec.name)
        try spec.validateSizes()
        guard spec.timeout.isFinite, spec.timeout > 0 else {
            throw MicroVMError.invalidArgument("--timeout \(spec.timeout) is not a positive number of seconds: give e.g. --timeout 60")
        }
        if let k = spec.kernel { try checkKernel(k) }
        if let i = spec.initrd { try checkFile(i, what: "initrd", flag: "--initrd") }
        if let r = spec.rootfs { try checkDirectory(r, what: "rootfs tree") }
        if let d = spec.rootfsDisk, mode.isVM { try checkFile(d, what: "root disk image", flag: "--image", blockDeviceOK: false) }
        if let env = spec.environment, let bad = VMSpec.badEnvironmentEntry(env) {
            throw MicroVMError.invalidArgument("environment entry '\(bad)' is not NAME=VALUE")
        }
        if let dir = spec.workingDirectory, !VMSpec.isWorkingDirectory(dir) {
            throw MicroVMError.invalidArgument("working directory '\(dir)' is not an absolute path")
        }
        for d in spec.disks {
            if mode == .container || mode == .native { try checkDirectory(d.path, what: "container disk (a host directory, mounted at /mnt)") }
            else { try checkFile(d.path, what: "disk image", flag: "--disk", blockDeviceOK: true) }
        }
        if mode == .container || mode == .native {
            guard !spec.command.isEmpty, !spec.command[0].isEmpty else {
                throw MicroVMError.invalidArgument("a container needs a command: e.g. mvm run --mode container -- echo hello")
            }
            if spec.kernel != nil || spec.initrd != nil {
                throw MicroVMError.invalidArgument("--kernel and --initrd are for VMs; a container runs on the host's kernel: drop them or use --mode direct or hosted")
            }
            if spec.vsockCID != nil {
                throw MicroVMError.unsupported("containers have no vsock (it is a VM's channel to its host); drop --vsock, or use --mode direct or hosted")
            }
            if spec.slice?.hugePages == true {
                throw MicroVMError.unsupported("huge pages back a VM's guest RAM; a container has none: drop hugePages from the profile, or use --mode direct or hosted")
            }
        }
        if mode.isVM {
            // The command, its environment and working directory reach the guest init on the
            // kernel command line (base64): an image with a large environment can overflow it.
            let used = KernelCommandLine.build(command: spec.command, rootfsReadOnly: true, initParameters: spec.initParameters, extra: spec.cmdline).utf8.count
            guard used <= KernelCommandLine.specBudget else {
                throw MicroVMError.invalidArgument("the guest kernel's command line would take \(used) bytes for the command, its environment and working directory (base64) and --cmdline; at most \(KernelCommandLine.specBudget) leave the devices room: shorten them")
            }
        }
        if spec.maxCPUs != nil, mode != .hosted {
            throw MicroVMError.unsupported(mode.isVM
                ? "--max-cpus boots a hosted VM with room for more vCPUs; the direct VMM has no CPU hotplug: its vCPUs are fixed at boot, and mvm update --quota and --weight change the CPU time they get"
                : "--max-cpus is for hosted VMs: a container's CPUs change live with mvm update --cpus, no room needed; drop it")
        }
        if let b = spec.balloon {
            guard mode.isVM else {
                throw MicroVMError.unsupported("--balloon gives a VM a virtio-balloon; a container's memory is its cgroup's: drop it, or use --mode direct or hosted")
            }
            guard b.amount < spec.memory, (0...86_400).contains(b.statsInterval) else {
                throw MicroVMError.invalidArgument("the balloon (\(b.amount), statistics every \(b.statsInterval) s) must be smaller than the guest's \(spec.memory), its interval 0...86400 s")
            }
        }
        if let cid = spec.vsockCID, cid < 3 || cid == UInt32.max {
            throw MicroVMError.invalidArgument("--vsock \(cid) is reserved (0-2 are the hypervisor, local and host; \(UInt32.max) is 'any'): use a CID of 3 or more")
        }
        if let net = spec.net {
            for (label, a) in [("host", net.hostAddress), ("guest", net.guestAddress)] {
                if let a, !NetSpec.isIPv4CIDR(a) { throw MicroVMError.invalidArgument("--net \(label)=\(a) is not an IPv4 address (a.b.c.d or a.b.c.d/len)") }
            }
            if let t = net.tap, t.isEmpty || t.count > 15 || t.contains("/") || t.contains(where: \.isWhitespace) {
                throw MicroVMError.invalidArgument("--net tap=\(t) is not a usable interface name: use 1-15 characters without '/' or spaces")
            }
        }
    }

    /// Names go into paths, cgroup names, runtime ids and libvirt domain names.
    public static func validateName(_ name: String) throws {
        let ok = !name.isEmpty && name.count <= 48 && !name.hasPrefix(".") && !name.hasPrefix("-")
            && name.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "-_.".contains($0)) }
        guard ok else {
            throw MicroVMError.invalidArgument("instance name '\(name)' is not usable: use 1-48 letters, digits, '-', '_' or '.', not starting with '.' or '-'")
        }
    }

    /// A kernel is a bzImage (the "HdrS" setup header at 0x202) or an ELF vmlinux; anything else
    /// is named as not a kernel, before any host check.
    public static func checkKernel(_ path: String) throws {
        try checkFile(path, what: "kernel", flag: "--kernel")
        guard let fh = FileHandle(forReadingAtPath: path) else {
            throw MicroVMError(.permissionDenied, "kernel '\(path)' cannot be read: check its permissions")
        }
        defer { try? fh.close() }
        let head = (try? fh.read(upToCount: 0x206)) ?? Data()
        let isELF = head.count >= 4 && head.prefix(4) == Data([0x7f, 0x45, 0x4c, 0x46])
        let isBzImage = head.count >= 0x206 && head[0x202..<0x206] == Data("HdrS".utf8)
        guard isELF || isBzImage else {
            throw MicroVMError(.invalidImage, "kernel '\(path)' is not a kernel: it is neither a bzImage (no 'HdrS' setup header at 0x202) nor an ELF vmlinux; pass a Linux kernel such as /boot/vmlinuz-*")
        }
    }

    static func checkFile(_ path: String, what: String, flag: String, blockDeviceOK: Bool = false) throws {
        var st = stat()
        guard stat(path, &st) == 0 else {
            throw MicroVMError.notFound("\(what) '\(path)' does not exist\(rigHint(path)): pass an existing file to \(flag)")
        }
        let type = st.st_mode & S_IFMT
        guard type == S_IFREG || (blockDeviceOK && type == S_IFBLK) else {
            throw MicroVMError.invalidArgument("\(what) '\(path)' is not a regular file\(blockDeviceOK ? " or block device" : ""): pass a file to \(flag)")
        }
        guard access(path, R_OK) == 0 else {
            throw MicroVMError(.permissionDenied, "\(what) '\(path)' cannot be read: check its permissions")
        }
    }

    static func checkDirectory(_ path: String, what: String) throws {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
            throw MicroVMError.notFound("\(what) '\(path)' does not exist\(rigHint(path))")
        }
        guard isDir.boolValue else { throw MicroVMError.invalidArgument("\(what) '\(path)' is not a directory") }
    }

    /// Inside `mvm rig run`, /tmp, /var/tmp and /run are the rig's own, fresh: a host file there
    /// is not missing, it is out of sight.
    static func rigHint(_ path: String, inRig: Bool = RigEnvironment.isInside) -> String {
        guard inRig, let top = ["/tmp/", "/var/tmp/", "/run/"].first(where: { path.hasPrefix($0) }) else { return "" }
        return " inside the rig (its \(top.dropLast()) is fresh, not the host's; put the file in the working directory or pass --share \((path as NSString).deletingLastPathComponent) to mvm rig run)"
    }
}
