// mvm-kvm-floor: the least a VMM can do to run a tiny PVH guest, in C, for `mvm bench --scenarios
// vmm`: the KVM calls mvm-vmm makes for it (a VM with an in-kernel interrupt controller and PIT,
// guest RAM, one vCPU with the host's CPUID in 32-bit protected mode at the ELF's entry), then
// KVM_RUN until the guest resets through the i8042 (out 0xfe to port 0x64), triple-faults or
// halts. No devices, no threads, no API: the floor the VMM's own start and exit are measured
// against.
//
//     mvm-kvm-floor [--memory-mib N] [--kvm-device PATH] GUEST.elf
//
// Exit status: 0 when the guest reset or shut down, 1 on any other end, 2 on bad arguments.
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static int fail(const char *what) {
    fprintf(stderr, "mvm-kvm-floor: %s: %s\n", what, strerror(errno));
    return 1;
}

int main(int argc, char **argv) {
    const char *device = "/dev/kvm", *guest = NULL;
    unsigned long mib = 128;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--memory-mib") && i + 1 < argc) mib = strtoul(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--kvm-device") && i + 1 < argc) device = argv[++i];
        else if (argv[i][0] != '-' && !guest) guest = argv[i];
        else { fprintf(stderr, "usage: mvm-kvm-floor [--memory-mib N] [--kvm-device PATH] GUEST.elf\n"); return 2; }
    }
    if (!guest || mib < 32 || mib > 65536) { fprintf(stderr, "mvm-kvm-floor: give a guest ELF and 32..65536 MiB\n"); return 2; }
    size_t size = (size_t)mib << 20;

    int fd = open(guest, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return fail(guest);
    struct stat st;
    if (fstat(fd, &st) < 0 || st.st_size < (off_t)sizeof(Elf64_Ehdr) || st.st_size > (16 << 20)) { fprintf(stderr, "mvm-kvm-floor: %s: not a small ELF\n", guest); return 2; }
    uint8_t *image = malloc(st.st_size);
    if (!image || read(fd, image, st.st_size) != st.st_size) return fail("read the guest");
    close(fd);
    Elf64_Ehdr *eh = (Elf64_Ehdr *)image;
    if (memcmp(eh->e_ident, ELFMAG, SELFMAG) || eh->e_ident[EI_CLASS] != ELFCLASS64 ||
        eh->e_phoff + (uint64_t)eh->e_phnum * sizeof(Elf64_Phdr) > (uint64_t)st.st_size) {
        fprintf(stderr, "mvm-kvm-floor: %s: not an ELF64 image\n", guest);
        return 2;
    }

    int kvm = open(device, O_RDWR | O_CLOEXEC);
    if (kvm < 0) return fail(device);
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) return fail("KVM_CREATE_VM");
    if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000UL) < 0) return fail("KVM_SET_TSS_ADDR");
    uint64_t identity = 0xfffbc000UL;
    if (ioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &identity) < 0) return fail("KVM_SET_IDENTITY_MAP_ADDR");
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) return fail("KVM_CREATE_IRQCHIP");
    struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
    if (ioctl(vm, KVM_CREATE_PIT2, &pit) < 0) return fail("KVM_CREATE_PIT2");

    uint8_t *ram = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (ram == MAP_FAILED) return fail("mmap guest RAM");
    struct kvm_userspace_memory_region region = { .slot = 0, .guest_phys_addr = 0, .memory_size = size, .userspace_addr = (uint64_t)ram };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) return fail("KVM_SET_USER_MEMORY_REGION");
    Elf64_Phdr *ph = (Elf64_Phdr *)(image + eh->e_phoff);
    for (int i = 0; i < eh->e_phnum; i++) {
        if (ph[i].p_type != PT_LOAD) continue;
        if (ph[i].p_offset + ph[i].p_filesz > (uint64_t)st.st_size || ph[i].p_paddr + ph[i].p_memsz > size || ph[i].p_filesz > ph[i].p_memsz) {
            fprintf(stderr, "mvm-kvm-floor: a segment lies outside the file or guest RAM\n");
            return 2;
        }
        memcpy(ram + ph[i].p_paddr, image + ph[i].p_offset, ph[i].p_filesz);
    }
    // A flat GDT: null, 32-bit code, data, TSS, as a PVH entry expects.
    uint64_t gdt[4] = { 0, 0x00cf9b000000ffffULL, 0x00cf93000000ffffULL, 0x008f89000000ffffULL };
    memcpy(ram + 0x500, gdt, sizeof gdt);

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) return fail("KVM_CREATE_VCPU");
    int runSize = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, runSize, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) return fail("mmap kvm_run");
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + 256 * sizeof(struct kvm_cpuid_entry2));
    if (!cpuid) return fail("calloc");
    cpuid->nent = 256;
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0) return fail("KVM_GET_SUPPORTED_CPUID");
    if (ioctl(vcpu, KVM_SET_CPUID2, cpuid) < 0) return fail("KVM_SET_CPUID2");

    struct kvm_sregs s;
    if (ioctl(vcpu, KVM_GET_SREGS, &s) < 0) return fail("KVM_GET_SREGS");
    struct kvm_segment code = { .base = 0, .limit = 0xffffffff, .selector = 0x08, .type = 11, .present = 1, .dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1 };
    struct kvm_segment data = code;
    data.selector = 0x10; data.type = 3;
    struct kvm_segment tss = { .base = 0, .limit = 0xfffff, .selector = 0x18, .type = 11, .present = 1, .s = 0, .g = 0 };
    s.cs = code; s.ds = s.es = s.fs = s.gs = s.ss = data; s.tr = tss;
    s.gdt.base = 0x500; s.gdt.limit = sizeof gdt - 1;
    s.idt.base = 0; s.idt.limit = 0;
    s.cr0 = 1; s.cr4 = 0; s.efer = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &s) < 0) return fail("KVM_SET_SREGS");
    struct kvm_regs r = { .rflags = 2, .rip = eh->e_entry };
    if (ioctl(vcpu, KVM_SET_REGS, &r) < 0) return fail("KVM_SET_REGS");

    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            return fail("KVM_RUN");
        }
        switch (run->exit_reason) {
        case KVM_EXIT_IO:
            if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == 0x64 &&
                *((uint8_t *)run + run->io.data_offset) == 0xfe) return 0;
            break;
        case KVM_EXIT_SHUTDOWN: return 0;
        case KVM_EXIT_MMIO: break;
        default:
            fprintf(stderr, "mvm-kvm-floor: the vCPU exited with reason %u\n", run->exit_reason);
            return 1;
        }
    }
}
