#define _GNU_SOURCE
#include "cjail.h"
#include <errno.h>
#include <linux/capability.h>
#include <sched.h>
#include <seccomp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

const int CJAIL_CLONE_THREAD = CLONE_THREAD;
const int CJAIL_PR_SET_NAME = PR_SET_NAME;
const int CJAIL_PR_GET_NAME = PR_GET_NAME;

int cjail_unshare_mount_ipc_uts(void) {
    return unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS) == 0 ? 0 : -errno;
}

int cjail_setresgid(gid_t gid) { return setresgid(gid, gid, gid) == 0 ? 0 : -errno; }
int cjail_setresuid(uid_t uid) { return setresuid(uid, uid, uid) == 0 ? 0 : -errno; }

int cjail_pivot_root(const char *new_root, const char *put_old) {
    return syscall(SYS_pivot_root, new_root, put_old) == 0 ? 0 : -errno;
}

int cjail_set_no_new_privs(void) {
    return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 ? 0 : -errno;
}

int cjail_drop_capability_bounds(void) {
    for (int cap = 0; cap <= 63; cap++) {
        if (prctl(PR_CAPBSET_READ, cap, 0, 0, 0) < 0) break;  // past the kernel's last capability
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0) return -errno;
    }
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && errno != EINVAL) return -errno;
    return 0;
}

int cjail_has_capabilities(void) {
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    if (syscall(SYS_capget, &header, data) != 0) return -errno;
    return (data[0].permitted | data[1].permitted | data[0].effective | data[1].effective) != 0;
}

int cjail_set_parent_death_signal(int sig) {
    return prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0 ? 0 : -errno;
}

void *cjail_filter_new(void) {
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_TRAP);
    // no_new_privs is set once, before the first filter: a thread narrowing its filter must
    // not need prctl for it again (its filter does not allow that prctl).
    if (ctx && seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0) != 0) { seccomp_release(ctx); return NULL; }
    return ctx;
}

int cjail_filter_allow(void *filter, const char *name, int argument, uint64_t mask, uint64_t value) {
    int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR) return -ENOENT;
    if (argument < 0) return seccomp_rule_add(filter, SCMP_ACT_ALLOW, nr, 0);
    struct scmp_arg_cmp cmp = mask != 0
        ? (struct scmp_arg_cmp){(unsigned)argument, SCMP_CMP_MASKED_EQ, mask, value}
        : (struct scmp_arg_cmp){(unsigned)argument, SCMP_CMP_EQ, value, 0};
    return seccomp_rule_add_array(filter, SCMP_ACT_ALLOW, nr, 1, &cmp);
}

int cjail_filter_fail(void *filter, const char *name, int error) {
    int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR) return -ENOENT;
    return seccomp_rule_add(filter, SCMP_ACT_ERRNO(error), nr, 0);
}

int cjail_filter_load(void *filter) { return seccomp_load(filter); }

void cjail_filter_release(void *filter) { seccomp_release(filter); }

int cjail_syscall_number(const char *name) {
    int nr = seccomp_syscall_resolve_name(name);
    return nr == __NR_SCMP_ERROR ? -1 : nr;
}

// The report is written from the signal handler: only what is async-signal-safe, so every
// name is resolved (and allocated) when the reporter is installed.
#define NAMES 512
static const char *names[NAMES];
static __thread const char *thread_kind = "main (or not yet confined)";

void cjail_set_thread_kind(int kind) {
    static const char *kinds[] = {"vCPU", "device I/O", "API"};
    if (kind >= 0 && kind < 3) thread_kind = kinds[kind];
}

static size_t append(char *buf, size_t at, size_t cap, const char *s) {
    while (*s && at + 1 < cap) buf[at++] = *s++;
    return at;
}

static void report(int sig, siginfo_t *info, void *context) {
    (void)context;
    char buf[256], num[16];
    int nr = info->si_syscall, n = nr < 0 ? 0 : nr, d = 0;
    char digits[16];
    do { digits[d++] = (char)('0' + n % 10); n /= 10; } while (n && d < 15);
    int k = 0;
    while (d) num[k++] = digits[--d];
    num[k] = 0;
    size_t at = 0;
    at = append(buf, at, sizeof buf, "mvm-vmm: seccomp: the ");
    at = append(buf, at, sizeof buf, thread_kind);
    at = append(buf, at, sizeof buf, " thread made the system call ");
    at = append(buf, at, sizeof buf, nr >= 0 && nr < NAMES && names[nr] ? names[nr] : "?");
    at = append(buf, at, sizeof buf, " (");
    at = append(buf, at, sizeof buf, num);
    at = append(buf, at, sizeof buf, "), which its filter does not allow\n");
    ssize_t ignored = write(2, buf, at);
    (void)ignored;
    // Die of the signal, so the parent sees SIGSYS: back to the default action, then raised
    // again; it arrives as soon as this handler returns and unblocks it. The first process of
    // a PID namespace ignores its own default-action signals, so there the VMM exits with the
    // status a shell gives a SIGSYS death, 128 + 31.
    long pid = syscall(SYS_getpid);
    if (pid == 1) syscall(SYS_exit_group, 128 + sig);
    signal(sig, SIG_DFL);
    syscall(SYS_tgkill, pid, syscall(SYS_gettid), sig);
}

int cjail_install_reporter(void) {
    for (int i = 0; i < NAMES; i++) if (!names[i]) names[i] = seccomp_syscall_resolve_num_arch(SCMP_ARCH_NATIVE, i);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = report;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGSYS, &sa, NULL) == 0 ? 0 : -errno;
}
