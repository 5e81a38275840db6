// mvm-agent: the guest's side of `mvm exec` and `mvm-runtime exec`. The guest init starts it when
// the kernel command line has mvm.vsock=PORT; it listens on that vsock port (or, for tests on a
// host without vsock, a unix socket) and runs one process per connection, inside the root disk
// when there is one. Static, libc only: it must run from the initramfs whatever the root holds.
//
//   mvm-agent (--vsock PORT | --unix PATH) [--root DIR] [--status-fifo FIFO]
//
// Every message both ways is a frame: a type byte, a 4-byte big-endian length, the payload.
// The host sends the request, then, once the process runs, its stdin and signals:
//   'A' one argument (argv[0] first)   'E' one environment entry, NAME=value (no PATH: a default one)
//   'W' the working directory          'U' "UID:GID" to run as (decimal)
//   'X' start the process              'I' bytes for its stdin     'C' close its stdin
//   'K' one byte: a signal for the process group
//   'M' (before 'X') this is the VM's own process: when it ends, its status also goes to FIFO,
//       where the guest init waits to end the VM with it
//   'T' (before 'X') a terminal for the process: a pseudo-terminal of the guest's is its stdin,
//       stdout and stderr, and its controlling terminal; its output comes as 'O'
//   'Z' "ROWS COLUMNS": the terminal's size (before 'X', or any time after)
//   'R' "RESOURCE SOFT HARD" (before 'X'): a setrlimit for the process (at most 16)
// The agent answers with the process's output and, last, its status:
//   'O' stdout bytes   'D' stderr bytes   'S' decimal status (128 + N when killed by signal N)
//   'F' why the request could not run (then 'S')
// The host is trusted (vsock reaches only this VM's host), but the agent still bounds what it
// takes: at most 1 MiB a frame, 4096 arguments and environment entries, 64 KiB of stdin pending.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

enum { max_frame = 1 << 20, max_words = 4096, max_pending = 64 << 10 };

static int write_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int send_frame(int fd, char type, const void *data, size_t len) {
    unsigned char head[5] = {(unsigned char)type, (unsigned char)(len >> 24), (unsigned char)(len >> 16),
                             (unsigned char)(len >> 8), (unsigned char)len};
    if (write_all(fd, head, sizeof head) < 0) return -1;
    return len ? write_all(fd, data, len) : 0;
}

static void send_text(int fd, char type, const char *text) { send_frame(fd, type, text, strlen(text)); }

// Reads exactly len bytes; 0 on success, -1 at end of stream or on error.
static int read_all(int fd, void *buf, size_t len) {
    char *p = buf;
    while (len > 0) {
        ssize_t n = read(fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

// One frame, its payload NUL-terminated in a fresh buffer the caller frees.
static int read_frame(int fd, char *type, char **payload, size_t *len) {
    unsigned char head[5];
    if (read_all(fd, head, sizeof head) < 0) return -1;
    size_t n = ((size_t)head[1] << 24) | ((size_t)head[2] << 16) | ((size_t)head[3] << 8) | head[4];
    if (n > max_frame) return -1;
    char *p = malloc(n + 1);
    if (!p || read_all(fd, p, n) < 0) { free(p); return -1; }
    p[n] = 0;
    *type = (char)head[0];
    *payload = p;
    *len = n;
    return 0;
}

struct request {
    char *argv[max_words + 1];
    int argc;
    char *envp[max_words + 2];  // room for a default PATH and the terminating NULL
    int envc;
    char *cwd;
    int uid, gid;
    int main;
    int terminal;
    struct winsize size;
    int nlimits;
    int limit_resource[16];
    struct rlimit limit[16];
};

static int parse_size(const char *p, struct winsize *ws) {
    unsigned rows, cols;
    if (sscanf(p, "%u %u", &rows, &cols) != 2 || rows > 65535 || cols > 65535) return -1;
    *ws = (struct winsize){.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
    return 0;
}

// In the child: the process itself, on the pipes or on the terminal `tty` (its controlling one).
// Errors go to its stderr, then exit 126 or 127 as a shell would.
static void run_child(struct request *r, const char *root, int in, int out, int err, const char *tty) {
    setsid();
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_DFL);
    if (tty) {
        int t = open(tty, O_RDWR);
        if (t < 0) _exit(126);
        ioctl(t, TIOCSCTTY, 0);
        in = out = err = t;
    }
    dup2(in, 0);
    dup2(out, 1);
    dup2(err, 2);
    if (root && chroot(root) != 0) { dprintf(2, "mvm-agent: chroot %s: %s\n", root, strerror(errno)); _exit(126); }
    const char *cwd = r->cwd ? r->cwd : "/";
    if (chdir(cwd) != 0) { dprintf(2, "mvm-agent: cannot enter %s: %s\n", cwd, strerror(errno)); _exit(126); }
    for (int i = 0; i < r->nlimits; i++) {
        if (setrlimit(r->limit_resource[i], &r->limit[i]) != 0) {
            dprintf(2, "mvm-agent: cannot set resource limit %d: %s\n", r->limit_resource[i], strerror(errno));
            _exit(126);
        }
    }
    if (r->uid >= 0) {
        if (setgroups(0, NULL) != 0 || setgid((gid_t)r->gid) != 0 || setuid((uid_t)r->uid) != 0) {
            dprintf(2, "mvm-agent: cannot run as %d:%d: %s\n", r->uid, r->gid, strerror(errno));
            _exit(126);
        }
    }
    // An environment without PATH gets the usual one, so commands are found as in a shell.
    static char default_path[] = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    int has_path = 0;
    for (int i = 0; i < r->envc; i++) has_path |= !strncmp(r->envp[i], "PATH=", 5);
    if (!has_path) r->envp[r->envc++] = default_path;
    r->envp[r->envc] = NULL;
    r->argv[r->argc] = NULL;
    extern char **environ;
    environ = r->envp; // execvp searches the command's own PATH
    execvp(r->argv[0], r->argv);
    int e = errno;
    dprintf(2, "mvm-agent: cannot run %s: %s\n", r->argv[0], strerror(e));
    _exit(e == ENOENT ? 127 : 126);
}

// Copies what one of the process's pipes has to the host as frames of type `type`; returns 0 at
// its end (or when the host is gone), 1 while it stays open.
static int pump(int from, int conn, char type) {
    char buf[16384];
    ssize_t n = read(from, buf, sizeof buf);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return 1;
    if (n <= 0) return 0;
    return send_frame(conn, type, buf, (size_t)n) < 0 ? 0 : 1;
}

static int serve(int conn, const char *root, const char *status_fifo) {
    struct request r = {.argc = 0, .envc = 0, .cwd = NULL, .uid = -1, .gid = -1, .main = 0, .nlimits = 0};
    char type, *p;
    size_t len;
    for (;;) {
        if (read_frame(conn, &type, &p, &len) < 0) return 1;
        if (type == 'X') { free(p); break; }
        if ((type == 'A' && r.argc == max_words) || (type == 'E' && r.envc == max_words)) {
            send_text(conn, 'F', "too many arguments or environment entries");
            send_text(conn, 'S', "126");
            return 1;
        }
        switch (type) {
        case 'A': r.argv[r.argc++] = p; break;
        case 'E': r.envp[r.envc++] = p; break;
        case 'W': r.cwd = p; break;
        case 'M': r.main = 1; free(p); break;
        case 'T': r.terminal = 1; free(p); break;
        case 'R': {
            unsigned long long soft, hard;
            int resource;
            if (r.nlimits == 16 || sscanf(p, "%d %llu %llu", &resource, &soft, &hard) != 3 || resource < 0 || resource >= RLIM_NLIMITS) {
                send_text(conn, 'F', "a resource limit must be RESOURCE SOFT HARD, at most 16 of them");
                send_text(conn, 'S', "126");
                return 1;
            }
            r.limit_resource[r.nlimits] = resource;
            r.limit[r.nlimits++] = (struct rlimit){.rlim_cur = soft, .rlim_max = hard};
            free(p);
            break;
        }
        case 'Z':
            if (parse_size(p, &r.size) < 0) {
                send_text(conn, 'F', "the terminal size must be ROWS COLUMNS");
                send_text(conn, 'S', "126");
                return 1;
            }
            free(p);
            break;
        case 'U':
            if (sscanf(p, "%d:%d", &r.uid, &r.gid) != 2 || r.uid < 0 || r.gid < 0) {
                send_text(conn, 'F', "the user must be UID:GID");
                send_text(conn, 'S', "126");
                return 1;
            }
            free(p);
            break;
        default: {
            char why[64];
            snprintf(why, sizeof why, "unknown request frame '%c'", type);
            send_text(conn, 'F', why);
            send_text(conn, 'S', "126");
            return 1;
        }
        }
    }
    if (r.argc == 0) {
        send_text(conn, 'F', "no command given");
        send_text(conn, 'S', "126");
        return 1;
    }
    // The process's stdin (in[1] is ours to write), stdout and stderr (out[0], err[0] ours to
    // read): three pipes, or one terminal whose master is all three (no stderr of its own).
    int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1}, master = -1;
    char tty[64] = {0};
    if (r.terminal) {
        master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (master < 0 || grantpt(master) || unlockpt(master) || ptsname_r(master, tty, sizeof tty)) {
            char why[128];
            snprintf(why, sizeof why, "cannot open a terminal in the guest: %s", strerror(errno));
            send_text(conn, 'F', why);
            send_text(conn, 'S', "126");
            return 1;
        }
        if (r.size.ws_row || r.size.ws_col) ioctl(master, TIOCSWINSZ, &r.size);
        in[1] = fcntl(master, F_DUPFD_CLOEXEC, 3);
        out[0] = master;
    } else if (pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC)) {
        send_text(conn, 'F', "cannot make pipes");
        send_text(conn, 'S', "126");
        return 1;
    }
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    int sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
    pid_t pid = fork();
    if (pid < 0) {
        send_text(conn, 'F', "cannot fork");
        send_text(conn, 'S', "126");
        return 1;
    }
    if (pid == 0) run_child(&r, root, in[0], out[1], err[1], r.terminal ? tty : NULL);
    if (!r.terminal) {
        close(in[0]);
        close(out[1]);
        close(err[1]);
    }
    fcntl(in[1], F_SETFL, O_NONBLOCK);

    int status = -1, out_open = 1, err_open = !r.terminal, conn_open = 1;
    char *pending = malloc(max_pending);
    size_t pending_len = 0;
    int close_stdin = 0;
    while (status < 0 || out_open || err_open) {
        struct pollfd f[5];
        int nf = 0, i_out = -1, i_err = -1, i_conn = -1, i_in = -1, i_sig;
        i_sig = nf; f[nf++] = (struct pollfd){.fd = sfd, .events = POLLIN};
        if (out_open) { i_out = nf; f[nf++] = (struct pollfd){.fd = out[0], .events = POLLIN}; }
        if (err_open) { i_err = nf; f[nf++] = (struct pollfd){.fd = err[0], .events = POLLIN}; }
        // The host's frames wait while stdin has a backlog: the process reads at its own pace.
        if (conn_open && pending_len == 0) { i_conn = nf; f[nf++] = (struct pollfd){.fd = conn, .events = POLLIN}; }
        if (in[1] >= 0 && pending_len > 0) { i_in = nf; f[nf++] = (struct pollfd){.fd = in[1], .events = POLLOUT}; }
        // Once the process has exited, what its pipes still hold is drained without waiting on
        // a background child that keeps them open.
        if (poll(f, (nfds_t)nf, status >= 0 ? 0 : -1) < 0 && errno != EINTR) break;
        if (status >= 0 && !(i_out >= 0 && (f[i_out].revents & (POLLIN | POLLHUP))) &&
            !(i_err >= 0 && (f[i_err].revents & (POLLIN | POLLHUP)))) break;
        if (f[i_sig].revents & POLLIN) {
            struct signalfd_siginfo si;
            while (read(sfd, &si, sizeof si) > 0) {}
            int ws;
            if (status < 0 && waitpid(pid, &ws, WNOHANG) == pid)
                status = WIFEXITED(ws) ? WEXITSTATUS(ws) : 128 + WTERMSIG(ws);
        }
        if (i_out >= 0 && (f[i_out].revents & (POLLIN | POLLHUP | POLLERR))) out_open = pump(out[0], conn, 'O');
        if (i_err >= 0 && (f[i_err].revents & (POLLIN | POLLHUP | POLLERR))) err_open = pump(err[0], conn, 'D');
        if (i_in >= 0 && (f[i_in].revents & (POLLOUT | POLLERR | POLLHUP))) {
            ssize_t n = write(in[1], pending, pending_len);
            if (n > 0) { memmove(pending, pending + n, pending_len - (size_t)n); pending_len -= (size_t)n; }
            else if (n < 0 && errno != EAGAIN && errno != EINTR) pending_len = 0, close_stdin = 1; // the process closed its stdin
        }
        if (i_conn >= 0 && (f[i_conn].revents & (POLLIN | POLLHUP | POLLERR))) {
            if (read_frame(conn, &type, &p, &len) < 0) {
                // The host went away: the process ends as a terminal's would.
                conn_open = 0;
                close_stdin = 1;
                kill(-pid, SIGHUP);
            } else {
                if (type == 'I' && in[1] >= 0 && len <= max_pending) { memcpy(pending, p, len); pending_len = len; }
                else if (type == 'C') close_stdin = 1;
                else if (type == 'K' && len == 1 && p[0] > 0 && p[0] < 65) kill(-pid, p[0]);
                else if (type == 'Z' && master >= 0 && parse_size(p, &r.size) == 0) ioctl(master, TIOCSWINSZ, &r.size);
                free(p);
            }
        }
        if (close_stdin && pending_len == 0 && in[1] >= 0) { close(in[1]); in[1] = -1; }
    }
    if (status < 0) {
        int ws;
        waitpid(pid, &ws, 0);
        status = WIFEXITED(ws) ? WEXITSTATUS(ws) : 128 + WTERMSIG(ws);
    }
    char text[16];
    snprintf(text, sizeof text, "%d", status);
    send_text(conn, 'S', text);
    if (r.main && status_fifo) {
        int fifo = open(status_fifo, O_WRONLY | O_CLOEXEC);
        if (fifo >= 0) { dprintf(fifo, "%d\n", status); close(fifo); }
    }
    return 0;
}

static int listen_on(const char *vsock_port, const char *unix_path) {
    int fd;
    if (vsock_port) {
        fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = (unsigned)atoi(vsock_port)};
        if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0) return -1;
    } else {
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        if (fd < 0 || strlen(unix_path) >= sizeof a.sun_path) return -1;
        strcpy(a.sun_path, unix_path);
        unlink(unix_path);
        if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0) return -1;
    }
    return listen(fd, 16) == 0 ? fd : -1;
}

int main(int argc, char **argv) {
    const char *vsock_port = NULL, *unix_path = NULL, *root = NULL, *status_fifo = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--vsock")) vsock_port = argv[i + 1];
        else if (!strcmp(argv[i], "--unix")) unix_path = argv[i + 1];
        else if (!strcmp(argv[i], "--root")) root = argv[i + 1];
        else if (!strcmp(argv[i], "--status-fifo")) status_fifo = argv[i + 1];
    }
    if ((argc % 2) != 1 || !!vsock_port == !!unix_path) {
        fprintf(stderr, "usage: mvm-agent (--vsock PORT | --unix PATH) [--root DIR] [--status-fifo FIFO]\n");
        return 2;
    }
    int fd = listen_on(vsock_port, unix_path);
    if (fd < 0) { fprintf(stderr, "mvm-agent: cannot listen: %s\n", strerror(errno)); return 1; }
    // Connection handlers are reaped by the kernel; a host that hangs up must not kill the agent.
    signal(SIGCHLD, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    for (;;) {
        int conn = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
        if (conn < 0) { if (errno != EINTR) usleep(10000); continue; }
        pid_t pid = fork();
        if (pid == 0) {
            close(fd);
            signal(SIGCHLD, SIG_DFL);
            _exit(serve(conn, root, status_fifo));
        }
        close(conn);
    }
}
