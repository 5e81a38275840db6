#ifndef CLINUX_H
#define CLINUX_H
// Linux calls the Swift Glibc module leaves out: glibc declares them only under _GNU_SOURCE or
// in headers the module does not cover (<sys/eventfd.h>, <sys/timerfd.h>, <sys/pidfd.h>,
// <sys/random.h>). Plain wrappers, linked, so they work in a statically linked process too,
// where looking symbols up by name finds nothing.
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

int clinux_eventfd(unsigned int initval, int flags);
int clinux_timerfd_create(int clockid, int flags);
int clinux_timerfd_settime(int fd, int flags, const struct itimerspec *value);
ssize_t clinux_getrandom(void *buf, size_t count, unsigned int flags);
/// sched_setaffinity/sched_getaffinity on a raw CPU mask of `bytes` bytes.
int clinux_sched_setaffinity(pid_t tid, size_t bytes, const void *mask);
int clinux_sched_getaffinity(pid_t tid, size_t bytes, void *mask);
pid_t clinux_gettid(void);
int clinux_unshare(int flags);
/// pidfd_open(2) through syscall(2): glibc before 2.36 has no wrapper. -1 with errno on failure.
int clinux_pidfd_open(pid_t pid, unsigned int flags);
/// Names the calling thread (the kernel keeps 15 bytes).
int clinux_set_thread_name(const char *name);
/// Unmaps the pages of the read-only segments (code and constants) of the executable and of
/// every library loaded from the process's page tables: MADV_DONTNEED on file-backed pages
/// nobody writes. They stay in the page cache and come back, a fault each, when next touched.
/// Returns the bytes of address space advised, or -1 with errno.
long clinux_drop_read_only_pages(void);

#endif
