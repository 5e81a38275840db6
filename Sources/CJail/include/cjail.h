#ifndef CJAIL_H
#define CJAIL_H
// What the VMM's jail needs from C: calls glibc does not wrap or declares variadic (pivot_root,
// prctl), and libseccomp behind a handful of functions. Policy lives in Swift (Jail).
#include <stdint.h>
#include <sys/types.h>

/// Flags the Swift Glibc module leaves out (they need _GNU_SOURCE).
extern const int CJAIL_CLONE_THREAD;
extern const int CJAIL_PR_SET_NAME;
extern const int CJAIL_PR_GET_NAME;

/// unshare(2) of new mount, IPC and UTS namespaces. Returns 0 or -errno.
int cjail_unshare_mount_ipc_uts(void);
/// setresgid(2) and setresuid(2) with one id for real, effective and saved. 0 or -errno.
int cjail_setresgid(gid_t gid);
int cjail_setresuid(uid_t uid);
/// pivot_root(2). Returns 0 or -errno.
int cjail_pivot_root(const char *new_root, const char *put_old);
/// prctl(PR_SET_NO_NEW_PRIVS, 1). Returns 0 or -errno.
int cjail_set_no_new_privs(void);
/// Drops every capability from the bounding set and clears the ambient set (needs
/// CAP_SETPCAP). Returns 0 or -errno.
int cjail_drop_capability_bounds(void);
/// Whether the calling thread holds any permitted or effective capability (1), none (0), or -errno.
int cjail_has_capabilities(void);
/// prctl(PR_SET_PDEATHSIG, sig).
int cjail_set_parent_death_signal(int sig);

/// A seccomp filter being built (libseccomp's context). Its default action traps (SIGSYS).
void *cjail_filter_new(void);
/// Allows a system call by name; with `argument` >= 0 only when that argument equals `value`
/// (after `mask`, when `mask` is not 0). Returns 0, -ENOENT for a name the kernel's table lacks,
/// or another -errno.
int cjail_filter_allow(void *filter, const char *name, int argument, uint64_t mask, uint64_t value);
/// Makes a system call fail with `error` instead of trapping (clone3 → ENOSYS, so the C library
/// falls back to clone, whose flags a filter can read).
int cjail_filter_fail(void *filter, const char *name, int error);
/// Loads the filter on the calling thread (threads it starts inherit it). Returns 0 or -errno.
int cjail_filter_load(void *filter);
void cjail_filter_release(void *filter);

/// Installs the SIGSYS handler that reports a forbidden system call before the process dies of
/// it: "mvm-vmm: seccomp: the <kind> thread made the system call <name> (<number>), which its
/// filter does not allow". `kind` names the calling thread's kind in later reports.
int cjail_install_reporter(void);
/// Names the calling thread's kind in reports: 0 vCPU, 1 device I/O, 2 API.
void cjail_set_thread_kind(int kind);
/// The system call's number on this architecture, or -1.
int cjail_syscall_number(const char *name);

#endif
