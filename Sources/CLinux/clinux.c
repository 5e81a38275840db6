#define _GNU_SOURCE
#include "clinux.h"
#include <errno.h>
#include <link.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <unistd.h>

int clinux_eventfd(unsigned int initval, int flags) { return eventfd(initval, flags); }

int clinux_timerfd_create(int clockid, int flags) { return timerfd_create(clockid, flags); }

int clinux_timerfd_settime(int fd, int flags, const struct itimerspec *value) {
    return timerfd_settime(fd, flags, value, NULL);
}

ssize_t clinux_getrandom(void *buf, size_t count, unsigned int flags) { return getrandom(buf, count, flags); }

int clinux_sched_setaffinity(pid_t tid, size_t bytes, const void *mask) {
    return sched_setaffinity(tid, bytes, (const cpu_set_t *)mask);
}

int clinux_sched_getaffinity(pid_t tid, size_t bytes, void *mask) {
    return sched_getaffinity(tid, bytes, (cpu_set_t *)mask);
}

pid_t clinux_gettid(void) { return (pid_t)syscall(SYS_gettid); }

int clinux_unshare(int flags) { return unshare(flags); }

int clinux_pidfd_open(pid_t pid, unsigned int flags) {
#ifdef SYS_pidfd_open
    return (int)syscall(SYS_pidfd_open, pid, flags);
#else
    errno = ENOSYS;
    return -1;
#endif
}

int clinux_set_thread_name(const char *name) {
    char cut[16];
    size_t i = 0;
    for (; i < 15 && name[i]; i++) cut[i] = name[i];
    cut[i] = 0;
    return pthread_setname_np(pthread_self(), cut);
}

/* Every loaded object's PT_LOAD segments without PF_W hold code, read-only data and headers:
   never written (no text relocations), so dropping their pages loses nothing. The vDSO, a
   mapping of the kernel's, is left alone. */
static int drop_read_only_segments(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
    long *advised = data;
    if (*advised < 0 || info->dlpi_addr == (ElfW(Addr))getauxval(AT_SYSINFO_EHDR)) return 0;
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type != PT_LOAD || (ph->p_flags & PF_W)) continue;
        uintptr_t start = (info->dlpi_addr + ph->p_vaddr) & ~(page - 1);
        uintptr_t end = (info->dlpi_addr + ph->p_vaddr + ph->p_memsz) & ~(page - 1);
        if (end <= start) continue;
        if (madvise((void *)start, end - start, MADV_DONTNEED) != 0) { *advised = -1; return 1; }
        *advised += (long)(end - start);
    }
    return 0;
}

long clinux_drop_read_only_pages(void) {
    long advised = 0;
    dl_iterate_phdr(drop_read_only_segments, &advised);
    return advised;
}
