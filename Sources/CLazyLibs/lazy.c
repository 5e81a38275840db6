#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include "clazylibs.h"

static const char *const sonames[2] = { "libvirt.so.0", "libguestfs.so.0" };
static const char *const packages[2] = { "libvirt0", "libguestfs0" };
static void *handles[2];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void *load(int lib, int fatal) {
    void *h = __atomic_load_n(&handles[lib], __ATOMIC_ACQUIRE);
    if (h) return h;
    pthread_mutex_lock(&lock);
    h = handles[lib];
    if (!h) {
        h = dlopen(sonames[lib], RTLD_NOW | RTLD_LOCAL);
        if (!h && fatal) {
            fprintf(stderr, "mvm: cannot load %s (%s): install it with apt-get install %s\n", sonames[lib], dlerror(), packages[lib]);
            abort();
        }
        __atomic_store_n(&handles[lib], h, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&lock);
    return h;
}

int mvm_lazy_available(int lib) { return load(lib, 0) != NULL; }

int mvm_lazy_installed(int lib) {
    if (__atomic_load_n(&handles[lib], __ATOMIC_ACQUIRE)) return 1;
    static const char *const dirs[] = { "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu",
                                        "/usr/lib/aarch64-linux-gnu", "/lib64", "/usr/lib64", "/usr/local/lib", "/usr/lib" };
    char path[512];
    for (size_t i = 0; i < sizeof dirs / sizeof dirs[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", dirs[i], sonames[lib]);
        if (access(path, R_OK) == 0) return 1;
    }
    /* Not in the usual places: let the dynamic linker look (LD_LIBRARY_PATH, ld.so.conf). */
    return mvm_lazy_available(lib);
}

/* Called by a trampoline the first time its function is used; returns the real function. */
__attribute__((visibility("hidden"))) void *mvm_lazy_resolve(const char *name, long lib, void **slot) {
    void *f = dlsym(load((int)lib, 1), name);
    if (!f) {
        fprintf(stderr, "mvm: %s has no function %s: install a matching %s\n", sonames[lib], name, packages[lib]);
        abort();
    }
    __atomic_store_n(slot, f, __ATOMIC_RELEASE);
    return f;
}

void *mvm_lazy_libvirt_default_auth(void) {
    static void *slot;
    void **p = __atomic_load_n(&slot, __ATOMIC_ACQUIRE);
    if (!p) p = mvm_lazy_resolve("virConnectAuthPtrDefault", 0, &slot);
    return *p;
}

/* A global function NAME that jumps to the real one, resolving it on the first call. The six
   integer argument registers are saved around the resolver (none of these functions takes
   floating-point or variadic arguments), and the stack stays 16-byte aligned for the call. */
#define TRAMPOLINE(lib, name)                                                                  \
    __attribute__((visibility("hidden"), used)) void *mvm_lazy_slot_##name;                   \
    __asm__(".text\n"                                                                          \
            ".globl " #name "\n"                                                               \
            ".type " #name ", @function\n"                                                     \
            #name ":\n"                                                                        \
            "    movq mvm_lazy_slot_" #name "(%rip), %rax\n"                                   \
            "    testq %rax, %rax\n"                                                           \
            "    jz 1f\n"                                                                      \
            "    jmp *%rax\n"                                                                  \
            "1:  pushq %rdi\n    pushq %rsi\n    pushq %rdx\n"                                 \
            "    pushq %rcx\n    pushq %r8\n    pushq %r9\n"                                   \
            "    subq $8, %rsp\n"                                                              \
            "    leaq 2f(%rip), %rdi\n"                                                        \
            "    movq $" #lib ", %rsi\n"                                                       \
            "    leaq mvm_lazy_slot_" #name "(%rip), %rdx\n"                                   \
            "    call mvm_lazy_resolve\n"                                                      \
            "    addq $8, %rsp\n"                                                              \
            "    popq %r9\n    popq %r8\n    popq %rcx\n"                                      \
            "    popq %rdx\n    popq %rsi\n    popq %rdi\n"                                    \
            "    jmp *%rax\n"                                                                  \
            ".size " #name ", .-" #name "\n"                                                   \
            ".section .rodata\n"                                                               \
            "2:  .asciz \"" #name "\"\n"                                                       \
            ".text\n");

#define VIR(name) TRAMPOLINE(0, name)
#define GFS(name) TRAMPOLINE(1, name)

VIR(virConnectClose) VIR(virConnectDomainEventDeregisterAny) VIR(virConnectDomainEventRegisterAny)
VIR(virConnectGetDomainCapabilities) VIR(virConnectGetLibVersion) VIR(virConnectListAllDomains)
VIR(virConnectOpen) VIR(virConnectOpenAuth) VIR(virDomainBlockStats) VIR(virDomainCreate)
VIR(virDomainCreateXML) VIR(virDomainDefineXML) VIR(virDomainDestroy) VIR(virDomainFree)
VIR(virDomainGetInfo) VIR(virDomainGetName) VIR(virDomainGetUUIDString) VIR(virDomainGetXMLDesc)
VIR(virDomainInterfaceStats) VIR(virDomainLookupByName) VIR(virDomainMemoryStats) VIR(virDomainSetMemoryFlags) VIR(virDomainSetVcpusFlags)
VIR(virDomainShutdown)
VIR(virDomainUndefine) VIR(virEventRegisterDefaultImpl) VIR(virEventRunDefaultImpl) VIR(virGetLastError)
VIR(virInitialize) VIR(virResetLastError) VIR(virSetErrorFunc)

GFS(guestfs_add_drive_opts_argv) GFS(guestfs_close) GFS(guestfs_create) GFS(guestfs_inspect_get_distro)
GFS(guestfs_inspect_get_product_name) GFS(guestfs_inspect_get_type) GFS(guestfs_inspect_os)
GFS(guestfs_last_error) GFS(guestfs_launch) GFS(guestfs_list_filesystems) GFS(guestfs_list_partitions)
GFS(guestfs_set_backend) GFS(guestfs_set_backend_settings) GFS(guestfs_set_error_handler)
GFS(guestfs_shutdown) GFS(guestfs_vfs_label) GFS(guestfs_blockdev_getsize64)
