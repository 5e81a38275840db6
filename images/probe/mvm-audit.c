/*
 * mvm-audit: what an instance can see of, and do to, the kernel it runs on.
 *
 * Built statically into the guest rootfs (/usr/bin/mvm-audit) and run once per backend by
 * `mvm bench --audit`. Prints one line of JSON on stdout (Sources/Bench/Audit.swift parses it;
 * docs/bench-schema.md describes it) and exits 0.
 *
 * It also runs natively, as root, on the host itself, so every attempt is harmless and undone:
 * the tmpfs is mounted on a fresh empty directory and unmounted at once, ptrace and unshare
 * happen in a forked child that exits, the key lives in this process's own keyring and is
 * invalidated, every descriptor is closed. Nothing is written or read beyond a few bytes of
 * headers; kexec, module loading, reboot and the like are never attempted.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/bpf.h>
#include <linux/io_uring.h>
#include <linux/perf_event.h>

#define PROBE_VERSION 1

/* ---- JSON output ------------------------------------------------------------------------ */

static int first_field = 1;

static void json_string(const char *s) {
    putchar('"');
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') printf("\\%c", *p);
        else if (*p < 0x20 || *p >= 0x7f) printf("\\u%04x", *p);
        else putchar(*p);
    }
    putchar('"');
}

static void key(const char *k) {
    if (!first_field) putchar(',');
    first_field = 0;
    json_string(k);
    putchar(':');
}

static void field_str(const char *k, const char *v) {
    key(k);
    if (v) json_string(v); else fputs("null", stdout);
}

static void field_int(const char *k, long v) { key(k); printf("%ld", v); }
static void open_object(const char *k) { key(k); putchar('{'); first_field = 1; }
static void close_object(void) { putchar('}'); first_field = 0; }

/* ---- helpers ---------------------------------------------------------------------------- */

/* The errno's name, as the report shows it ("EPERM"); unknown ones as "errno N". */
static const char *errno_name(int e) {
    static char other[32];
    const char *name = strerrorname_np(e);
    if (name) return name;
    snprintf(other, sizeof other, "errno %d", e);
    return other;
}

/* A syscall outcome in the report's words: 0 is "allowed", ENOSYS "not implemented". */
static const char *outcome(int err) {
    static char buf[64];
    if (err == 0) return "allowed";
    if (err == ENOSYS) return "not implemented (ENOSYS)";
    snprintf(buf, sizeof buf, "denied (%s)", errno_name(err));
    return buf;
}

/* Reads the first line of a small file into buf without its newline; 0 on success. */
static int read_line(const char *path, char *buf, size_t len) {
    FILE *f = fopen(path, "re");
    if (!f) return -1;
    if (!fgets(buf, (int)len, f)) { fclose(f); return -1; }
    fclose(f);
    buf[strcspn(buf, "\n")] = 0;
    return 0;
}

/* The value after "Name:\t" in /proc/self/status, or NULL. */
static const char *status_field(const char *name, char *buf, size_t len) {
    FILE *f = fopen("/proc/self/status", "re");
    if (!f) return NULL;
    char line[256];
    size_t n = strlen(name);
    const char *found = NULL;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, name, n) == 0 && line[n] == ':') {
            const char *v = line + n + 1;
            while (*v == ' ' || *v == '\t') v++;
            snprintf(buf, len, "%s", v);
            buf[strcspn(buf, "\n")] = 0;
            found = buf;
            break;
        }
    }
    fclose(f);
    return found;
}

/* Runs fn in a forked child (so namespaces, tracing and the like never touch this process)
 * and returns its errno (0: it succeeded). */
static int in_child(int (*fn)(void)) {
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0) return errno;
    pid_t pid = fork();
    if (pid < 0) { int e = errno; close(p[0]); close(p[1]); return e; }
    if (pid == 0) {
        close(p[0]);
        int e = fn();
        ssize_t w = write(p[1], &e, sizeof e);
        (void)w;
        _exit(0);
    }
    close(p[1]);
    int e = -1;
    ssize_t r;
    do { r = read(p[0], &e, sizeof e); } while (r < 0 && errno == EINTR);
    close(p[0]);
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {}
    if (r != (ssize_t)sizeof e) return ECHILD;
    return e;
}

/* ---- kernel, processes, identity -------------------------------------------------------- */

static void report_kernel(void) {
    struct utsname u;
    char boot[64];
    open_object("kernel");
    if (uname(&u) == 0) {
        field_str("release", u.release);
        field_str("version", u.version);
        field_str("machine", u.machine);
    }
    field_str("bootID", read_line("/proc/sys/kernel/random/boot_id", boot, sizeof boot) == 0 ? boot : NULL);
    close_object();
}

static int is_pid_name(const char *s) {
    if (!*s) return 0;
    for (; *s; s++) if (*s < '0' || *s > '9') return 0;
    return 1;
}

static void report_processes(void) {
    long visible = 0;
    DIR *d = opendir("/proc");
    if (d) {
        struct dirent *e;
        while ((e = readdir(d))) if (is_pid_name(e->d_name)) visible++;
        closedir(d);
    }
    char comm[64], ns[64];
    ssize_t n = readlink("/proc/self/ns/pid", ns, sizeof ns - 1);
    if (n >= 0) ns[n] = 0;
    open_object("processes");
    field_int("selfPID", (long)getpid());
    field_int("visible", d ? visible : -1);
    field_str("pid1", read_line("/proc/1/comm", comm, sizeof comm) == 0 ? comm : NULL);
    field_str("pidNamespace", n >= 0 ? ns : NULL);
    close_object();
}

static void report_identity(void) {
    char cap[64], sec[16], nnp[16];
    open_object("identity");
    field_int("uid", (long)getuid());
    field_str("capEff", status_field("CapEff", cap, sizeof cap));
    field_str("seccomp", status_field("Seccomp", sec, sizeof sec));
    field_str("noNewPrivs", status_field("NoNewPrivs", nnp, sizeof nnp));
    close_object();
}

/* ---- devices and host interfaces ------------------------------------------------------- */

static void report_devices(void) {
    long count = 0;
    char block[1024] = "";
    DIR *d = opendir("/dev");
    if (d) {
        struct dirent *e;
        struct stat st;
        char path[300];
        while ((e = readdir(d))) {
            if (e->d_name[0] == '.') continue;
            count++;
            snprintf(path, sizeof path, "/dev/%s", e->d_name);
            if (lstat(path, &st) == 0 && S_ISBLK(st.st_mode) && strlen(block) + strlen(e->d_name) + 2 < sizeof block) {
                if (block[0]) strcat(block, ",");
                strcat(block, e->d_name);
            }
        }
        closedir(d);
    }
    open_object("devices");
    field_int("count", d ? count : -1);
    field_str("block", block);
    /* Whether each can be opened read-only: opening reads nothing and changes nothing. */
    static const char *sensitive[] = {"kvm", "mem", "kmem", "port", "kmsg", "sda", "nvme0n1", "vda", "vdb", NULL};
    open_object("sensitive");
    for (int i = 0; sensitive[i]; i++) {
        char path[64];
        snprintf(path, sizeof path, "/dev/%s", sensitive[i]);
        struct stat st;
        if (stat(path, &st) != 0) { field_str(sensitive[i], "absent"); continue; }
        int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
        if (fd >= 0) { close(fd); field_str(sensitive[i], "openable"); continue; }
        char buf[48];
        snprintf(buf, sizeof buf, "present, open: %s", errno_name(errno));
        field_str(sensitive[i], buf);
    }
    close_object();
    close_object();
}

/* A file's readability: "readable", "empty (masked)" when it reads as nothing (runc binds
 * /dev/null over masked files), "denied (E…)" or "absent". Reads at most a few bytes. */
static void report_file(const char *k, const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        char buf[48];
        if (errno == ENOENT) field_str(k, "absent");
        else { snprintf(buf, sizeof buf, "denied (%s)", errno_name(errno)); field_str(k, buf); }
        return;
    }
    char b[16];
    ssize_t n = read(fd, b, sizeof b);
    int e = errno;
    close(fd);
    if (n > 0) field_str(k, "readable");
    else if (n == 0) field_str(k, "empty (masked)");
    else { char buf[48]; snprintf(buf, sizeof buf, "read denied (%s)", errno_name(e)); field_str(k, buf); }
}

/* Directories below path, to depth levels, counted (bounded: a host's cgroup tree can be large). */
static long count_dirs(const char *path, int depth) {
    if (depth == 0) return 0;
    DIR *d = opendir(path);
    if (!d) return 0;
    long n = 0;
    struct dirent *e;
    char sub[512];
    while ((e = readdir(d)) && n < 100000) {
        if (e->d_name[0] == '.' || e->d_type != DT_DIR) continue;
        n++;
        snprintf(sub, sizeof sub, "%s/%s", path, e->d_name);
        n += count_dirs(sub, depth - 1);
    }
    closedir(d);
    return n;
}

/* A directory: "absent", "denied (E…)" or its entry count. */
static void report_dir(const char *k, const char *path, char *names, size_t names_len) {
    DIR *d = opendir(path);
    if (!d) {
        char buf[48];
        if (errno == ENOENT) field_str(k, "absent");
        else { snprintf(buf, sizeof buf, "denied (%s)", errno_name(errno)); field_str(k, buf); }
        return;
    }
    long n = 0;
    struct dirent *e;
    if (names) names[0] = 0;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        n++;
        if (names && strlen(names) + strlen(e->d_name) + 2 < names_len) {
            if (names[0]) strcat(names, ",");
            strcat(names, e->d_name);
        }
    }
    closedir(d);
    char buf[48];
    if (n) snprintf(buf, sizeof buf, "%ld entries", n);
    field_str(k, n ? buf : "empty");
}

static void report_host_interfaces(void) {
    open_object("host");
    report_file("procKcore", "/proc/kcore");
    report_dir("sysFirmware", "/sys/firmware", NULL, 0);
    char names[1024];
    report_dir("cgroupRoot", "/sys/fs/cgroup", names, sizeof names);
    field_str("cgroupEntries", names);
    /* Cgroups (directories) below the root, three levels deep: the host's whole tree, or only the
     * instance's own cgroup when the runtime bound that at /sys/fs/cgroup. */
    field_int("cgroupDirs", count_dirs("/sys/fs/cgroup", 3));
    char self[256];
    field_str("selfCgroup", read_line("/proc/self/cgroup", self, sizeof self) == 0 ? self : NULL);
    close_object();
}

/* ---- sensitive system calls ------------------------------------------------------------- */

/* A call that returns a descriptor: closed at once; its errno, or 0 when it succeeded. */
static int fd_outcome(long fd) {
    if (fd < 0) return errno;
    close((int)fd);
    return 0;
}

static int try_mount(void) {
    static const char *bases[] = {"/tmp", "/dev/shm", "/run", "/var/tmp", NULL};
    char dir[64];
    int made = 0;
    for (int i = 0; bases[i] && !made; i++) {
        snprintf(dir, sizeof dir, "%s/mvm-audit-XXXXXX", bases[i]);
        made = mkdtemp(dir) != NULL;
    }
    if (!made) return -1;
    int err = 0;
    if (mount("mvm-audit", dir, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k") != 0) err = errno;
    else umount2(dir, MNT_DETACH);
    rmdir(dir);
    return err;
}

static int child_traceme(void) { return ptrace(PTRACE_TRACEME, 0, NULL, NULL) == 0 ? 0 : errno; }

static int try_bpf(void) {
    /* The smallest socket filter: r0 = 0; exit. Loaded, never attached. */
    struct bpf_insn insns[2] = {
        {.code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = 0, .imm = 0},
        {.code = BPF_JMP | BPF_EXIT},
    };
    union bpf_attr a;
    memset(&a, 0, sizeof a);
    a.prog_type = BPF_PROG_TYPE_SOCKET_FILTER;
    a.insns = (unsigned long)insns;
    a.insn_cnt = 2;
    a.license = (unsigned long)"GPL";
    return fd_outcome(syscall(SYS_bpf, BPF_PROG_LOAD, &a, sizeof a));
}

static int try_perf(void) {
    struct perf_event_attr a;
    memset(&a, 0, sizeof a);
    a.size = sizeof a;
    a.type = PERF_TYPE_SOFTWARE;
    a.config = PERF_COUNT_SW_TASK_CLOCK;
    a.disabled = 1;
    a.exclude_kernel = 1;
    a.exclude_hv = 1;
    return fd_outcome(syscall(SYS_perf_event_open, &a, 0, -1, -1, 0));
}

static int try_add_key(void) {
    /* KEY_SPEC_PROCESS_KEYRING (-2): the key dies with this process; KEYCTL_INVALIDATE (21) first. */
    long id = syscall(SYS_add_key, "user", "mvm-audit", "x", (size_t)1, -2);
    if (id < 0) return errno;
    syscall(SYS_keyctl, 21, id);
    return 0;
}

static int try_userfaultfd(void) {
    return fd_outcome(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
}

static int try_io_uring(void) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    return fd_outcome(syscall(SYS_io_uring_setup, 1, &p));
}

static int child_unshare_user(void) { return unshare(CLONE_NEWUSER) == 0 ? 0 : errno; }

static void report_syscalls(void) {
    open_object("syscalls");
    int m = try_mount();
    field_str("mount", m < 0 ? "not attempted (no writable temporary directory)" : outcome(m));
    field_str("ptrace", outcome(in_child(child_traceme)));
    field_str("bpf", outcome(try_bpf()));
    field_str("perf_event_open", outcome(try_perf()));
    field_str("add_key", outcome(try_add_key()));
    field_str("userfaultfd", outcome(try_userfaultfd()));
    field_str("io_uring_setup", outcome(try_io_uring()));
    field_str("unshare_user", outcome(in_child(child_unshare_user)));
    close_object();
}

int main(void) {
    putchar('{');
    field_str("probe", "mvm-audit");
    field_int("probeVersion", PROBE_VERSION);
    report_kernel();
    report_processes();
    report_identity();
    report_devices();
    report_host_interfaces();
    report_syscalls();
    puts("}");
    return fflush(stdout) == 0 ? 0 : 1;
}
