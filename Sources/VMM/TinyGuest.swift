/// Tiny guests for the VMM's own tests and benchmarks on hosts whose KVM cannot boot Linux: a
/// PVH ELF image (the boot protocol Linux's vmlinux uses) of a few instructions in 32-bit
/// protected mode. They need no kernel, boot in microseconds, and talk through the same PC
/// devices Linux uses.
public enum TinyGuest {
    /// Prints "K" on COM1, then echoes every byte the i8042 keyboard delivers to COM1 until it
    /// reads Delete's scancode (0x53), then resets through the i8042 as Linux's `reboot=k` does.
    /// Driven by `SendCtrlAltDel`, it shows a key press travel from the API into the guest and
    /// the reset end the VM.
    public static let keyboardEcho: [UInt8] = [
        0x66, 0xba, 0xf8, 0x03,  // mov dx, 0x3f8 (COM1)
        0xb0, 0x4b,              // mov al, 'K'
        0xee,                    // out dx, al
        0xe4, 0x64,              // poll: in al, 0x64 (status)
        0xa8, 0x01,              // test al, 1 (output buffer full)
        0x74, 0xfa,              // jz poll
        0xe4, 0x60,              // in al, 0x60 (data)
        0xee,                    // out dx, al
        0x3c, 0x53,              // cmp al, 0x53 (Delete pressed)
        0x75, 0xf3,              // jne poll
        0xb0, 0xfe,              // mov al, 0xfe (pulse reset)
        0xe6, 0x64,              // out 0x64, al
        0xf4,                    // hlt
    ]

    /// Ends the VM at its first instructions, whichever VMM runs it: a reset through the i8042
    /// (the direct VMM, Linux's `reboot=k`), then a write to QEMU's `isa-debug-exit` port 0xf4
    /// (QEMU's microvm has no i8042; QEMU then exits with status 253), then a triple fault (an
    /// empty IDT and an int3). The shortest life a VMM can give a guest.
    public static let resetAtOnce: [UInt8] = [
        0xb0, 0xfe,                                   // mov al, 0xfe (pulse reset)
        0xe6, 0x64,                                   // out 0x64, al
        0xe6, 0xf4,                                   // out 0xf4, al (isa-debug-exit)
        0x0f, 0x01, 0x1d, 0x00, 0x01, 0x00, 0x01,     // lidt [0x1000100]: zeros past the code, limit 0
        0xcc,                                         // int3: no IDT, so a triple fault
        0xf4, 0xeb, 0xfd,                             // hlt; jmp hlt
    ]

    /// Halts with interrupts off, for ever: the vCPU sleeps in the kernel and the VMM idles, as
    /// long as the VMM lets it (a memory figure of the VMM alone).
    public static let idle: [UInt8] = [
        0xfa,                                         // cli
        0xf4,                                         // hlt
        0xeb, 0xfd,                                   // jmp hlt
    ]

    /// Does what the guest init does for a command that printed nothing and exited 0: writes
    /// the boot timer (ready), prints the framed result on COM1, then resets through the i8042.
    /// A whole `mvm run --mode direct` on any KVM, an emulated one included.
    public static let reportsSuccess: [UInt8] = [
        0x66, 0xba, 0x40, 0x04,                       // mov dx, 0x440 (boot timer)
        0xb0, 0x7b,                                   // mov al, 123
        0xee,                                         // out dx, al
        0xbe, 0x20, 0x00, 0x00, 0x01,                 // mov esi, 0x1000020 (the message)
        0x66, 0xba, 0xf8, 0x03,                       // mov dx, 0x3f8 (COM1)
        0xac,                                         // next: lodsb
        0x84, 0xc0,                                   // test al, al
        0x74, 0x03,                                   // jz done
        0xee,                                         // out dx, al
        0xeb, 0xf8,                                   // jmp next
        0xb0, 0xfe,                                   // done: mov al, 0xfe
        0xe6, 0x64,                                   // out 0x64, al (reset)
        0xf4, 0x90, 0x90, 0x90,                       // hlt; pad to 0x20
    ] + Array("@@mvm:end status=0 bytes=0@@\n".utf8) + [0]

    /// Where the code is loaded and entered.
    public static let loadAddress: UInt64 = 0x100_0000

    /// An ELF64 image with one PT_LOAD of `code` at `loadAddress` and a PT_NOTE holding Xen's
    /// PHYS32_ENTRY note, which makes the loader enter it the PVH way.
    public static func pvhELF(code: [UInt8] = keyboardEcho) -> [UInt8] {
        func le16(_ v: UInt16) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
        func le32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
        func le64(_ v: UInt64) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
        let note = le32(4) + le32(4) + le32(18) + Array("Xen\0".utf8) + le32(UInt32(loadAddress))
        let phoff = 64, phnum = 2
        let noteOff = phoff + phnum * 56
        let codeOff = (noteOff + note.count + 15) & ~15
        var header = [0x7f, 0x45, 0x4c, 0x46, 2, 1, 1, 0] + [UInt8](repeating: 0, count: 8)
        header += le16(2) + le16(62) + le32(1) + le64(loadAddress) + le64(UInt64(phoff)) + le64(0)
        header += le32(0) + le16(64) + le16(56) + le16(UInt16(phnum)) + le16(64) + le16(0) + le16(0)
        let load = le32(1) + le32(5) + le64(UInt64(codeOff)) + le64(loadAddress) + le64(loadAddress)
            + le64(UInt64(code.count)) + le64(UInt64(code.count) + 4096) + le64(0x1000)
        let pnote = le32(4) + le32(4) + le64(UInt64(noteOff)) + le64(0) + le64(0)
            + le64(UInt64(note.count)) + le64(UInt64(note.count)) + le64(4)
        var image = header + load + pnote + note
        image += [UInt8](repeating: 0, count: codeOff - image.count)
        return image + code
    }
}
