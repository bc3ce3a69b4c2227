/*
 * dsec-agent: the in-sandbox agent. Spec: docs/agent-protocol.md.
 *
 * One single-threaded poll() loop serves any number of host connections (unix socket, an inherited fd, or a
 * virtio-serial char device) and multiplexes any number of processes and file transfers per connection.
 * Everything the agent writes goes through a per-connection output queue written without blocking, so one
 * slow host never stalls the others; child output is only read while that queue is small (backpressure),
 * and host input is only read while the stdin queues of its processes are small.
 *
 * Build: gcc -static -O2 -o dsec-agent agent.c   (dsec/agent/build.py does this)
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sched.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define HDR 9
#define MAX_PAYLOAD (1u << 20)
#define CHUNK 65536
#define OUT_HIGH (1u << 20)      /* stop producing output for a connection above this many queued bytes */
#define STDIN_MAX (64u << 20)    /* unwritten stdin a process may have queued before its stdin is cut off */
#define EXIT_GRACE_MS 100        /* after reaping, wait this long for pipes held by grandchildren */
#define DRAIN_MAX (1u << 20)     /* at most this much is drained from a pipe when the grace runs out */
#define REOPEN_DELAY_MS 100      /* device mode: wait before reopening a hung-up device */
#define MAX_CONNS 256
#define MAX_ARGS 4096

enum {
    H_SPAWN = 0x01, H_STDIN = 0x02, H_STDIN_EOF = 0x03, H_SIGNAL = 0x04, H_RESIZE = 0x05,
    H_READ_FILE = 0x10, H_WRITE_FILE = 0x11, H_LIST_DIR = 0x12, H_STAT = 0x13, H_PING = 0x20,
    A_STDOUT = 0x81, A_STDERR = 0x82, A_EXIT = 0x83, A_SPAWNED = 0x84, A_DATA = 0x85, A_END = 0x86,
    A_ENTRY = 0x87, A_OK = 0x88, A_ERROR = 0x8F, A_PONG = 0xA0,
};

typedef struct buf {
    char *data;
    size_t off, len, cap;   /* valid bytes are data[off, len) */
} buf_t;

typedef struct conn {
    int in_fd, out_fd;      /* the same fd except in odd setups; -1 when closed */
    char hdr[HDR];
    size_t hdr_got;
    char *payload;
    uint32_t want, got;
    int in_payload;
    buf_t out;
    int dead;
    int is_device;
    struct conn *next;
} conn_t;

enum { K_PROC, K_READ, K_WRITE };

typedef struct task {
    int kind;
    conn_t *conn;           /* NULL once the connection is gone (the task is then dropped) */
    uint32_t id;
    /* K_PROC */
    pid_t pid;
    int in_fd, out_fd, err_fd;
    int pty_fd;             /* the PTY master kept for RESIZE (-1 unless spawned with a PTY) */
    buf_t in;
    int in_eof_pending;     /* close stdin once `in` is drained */
    int reaped, status;
    long long reaped_at_ms;
    /* K_READ / K_WRITE */
    int file_fd;
    int write_errno;
    long long written;
    struct task *next;
} task_t;

static conn_t *conns;
static task_t *tasks;
static int listen_fd = -1;
static const char *device_path;
static long long device_retry_at_ms = -1;
static int fd_mode;          /* --fd: exit when the stream ends */
static int sig_pipe[2] = {-1, -1};
static volatile sig_atomic_t got_term;
/* DETACH: the tasks of a host that detaches for a checkpoint belong here until a connection ATTACHes them; its
   `dead` makes every frame to it dropped, and such tasks are neither read from nor finished meanwhile */
static conn_t parked = {.in_fd = -1, .out_fd = -1, .dead = 1};

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void die(const char *what) {
    fprintf(stderr, "dsec-agent: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) {
        fprintf(stderr, "dsec-agent: out of memory\n");
        exit(1);
    }
    return q;
}

static void set_nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0) fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

/* ---- buffers ---------------------------------------------------------------------------------------- */

static size_t buf_size(const buf_t *b) { return b->len - b->off; }

static void buf_append(buf_t *b, const void *data, size_t n) {
    if (b->off && b->off == b->len) b->off = b->len = 0;
    if (b->len + n > b->cap) {
        if (b->off) {
            memmove(b->data, b->data + b->off, b->len - b->off);
            b->len -= b->off;
            b->off = 0;
        }
        if (b->len + n > b->cap) {
            size_t cap = b->cap ? b->cap : 4096;
            while (cap < b->len + n) cap *= 2;
            b->data = xrealloc(b->data, cap);
            b->cap = cap;
        }
    }
    memcpy(b->data + b->len, data, n);
    b->len += n;
}

static void buf_free(buf_t *b) {
    free(b->data);
    memset(b, 0, sizeof *b);
}

/* Write as much of `b` to a non-blocking fd as it takes; returns -1 on a hard error. */
static int buf_flush(buf_t *b, int fd) {
    while (buf_size(b)) {
        ssize_t n = write(fd, b->data + b->off, buf_size(b));
        if (n > 0) {
            b->off += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return 0;
        } else {
            return -1;
        }
    }
    b->off = b->len = 0;
    return 0;
}

/* ---- frames out ------------------------------------------------------------------------------------- */

static void send_frame(conn_t *c, int type, uint32_t id, const void *payload, size_t n) {
    if (!c || c->dead) return;
    unsigned char h[HDR];
    h[0] = (unsigned char)type;
    h[1] = id >> 24; h[2] = id >> 16; h[3] = id >> 8; h[4] = id;
    h[5] = n >> 24; h[6] = n >> 16; h[7] = n >> 8; h[8] = n;
    buf_append(&c->out, h, HDR);
    if (n) buf_append(&c->out, payload, n);
}

/* A frame whose payload is a list of NUL-terminated strings. */
static void send_strings(conn_t *c, int type, uint32_t id, int count, ...) {
    const char *parts[8];
    size_t n = 0;
    va_list ap;
    va_start(ap, count);
    for (int i = 0; i < count && i < 8; i++) {
        parts[i] = va_arg(ap, const char *);
        n += strlen(parts[i]) + 1;
    }
    va_end(ap);
    char *payload = xrealloc(NULL, n), *p = payload;
    for (int i = 0; i < count && i < 8; i++) {
        size_t l = strlen(parts[i]) + 1;
        memcpy(p, parts[i], l);
        p += l;
    }
    send_frame(c, type, id, payload, n);
    free(payload);
}

static void send_error(conn_t *c, uint32_t id, int err, const char *fmt, ...) {
    char msg[PATH_MAX + 256], num[16];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    snprintf(num, sizeof num, "%d", err);
    send_strings(c, A_ERROR, id, 2, num, msg);
}

/* ---- tasks ------------------------------------------------------------------------------------------ */

static task_t *find_task(conn_t *c, uint32_t id) {
    for (task_t *t = tasks; t; t = t->next)
        if (t->conn == c && t->id == id) return t;
    return NULL;
}

static task_t *new_task(conn_t *c, uint32_t id, int kind) {
    task_t *t = calloc(1, sizeof *t);
    if (!t) die("calloc");
    t->kind = kind;
    t->conn = c;
    t->id = id;
    t->in_fd = t->out_fd = t->err_fd = t->file_fd = t->pty_fd = -1;
    t->next = tasks;
    tasks = t;
    return t;
}

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

static void drop_stdin(task_t *t) {
    buf_free(&t->in);
    close_fd(&t->in_fd);
    t->in_eof_pending = 0;
}

static void watch_forget(task_t *t);  /* filesystem section: frees a watch's directory table */

static void free_task(task_t *t) {
    watch_forget(t);
    for (task_t **p = &tasks; *p; p = &(*p)->next) {
        if (*p == t) {
            *p = t->next;
            break;
        }
    }
    drop_stdin(t);
    close_fd(&t->out_fd);
    close_fd(&t->err_fd);
    close_fd(&t->file_fd);
    close_fd(&t->pty_fd);
    free(t);
}

/* Forward what is buffered in a pipe (even past OUT_HIGH, so no output of the process itself is lost), then
   close it: a background grandchild may hold the write end open forever. */
static void drain_pipe(task_t *t, int *fd, int type) {
    static char chunk[CHUNK];
    for (int i = 0; *fd >= 0 && i < (int)(DRAIN_MAX / CHUNK); i++) {
        ssize_t r = read(*fd, chunk, sizeof chunk);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        send_frame(t->conn, type, t->id, chunk, (size_t)r);
    }
    close_fd(fd);
}

/* Send EXIT once the process is reaped and both pipes are closed (or the grace after reaping ran out). */
static void maybe_finish_proc(task_t *t) {
    if (!t->reaped) return;
    if (t->out_fd >= 0 || t->err_fd >= 0) {
        if (now_ms() - t->reaped_at_ms < EXIT_GRACE_MS) return;
        drain_pipe(t, &t->out_fd, A_STDOUT);
        drain_pipe(t, &t->err_fd, A_STDERR);
    }
    char code[16], sig[16];
    if (WIFSIGNALED(t->status)) {
        snprintf(code, sizeof code, "%d", -WTERMSIG(t->status));
        snprintf(sig, sizeof sig, "%d", WTERMSIG(t->status));
    } else {
        snprintf(code, sizeof code, "%d", WEXITSTATUS(t->status));
        snprintf(sig, sizeof sig, "0");
    }
    send_strings(t->conn, A_EXIT, t->id, 2, code, sig);
    free_task(t);
}

static void reap_children(void) {
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid <= 0) {
            if (pid < 0 && errno == EINTR) continue;
            return;
        }
        for (task_t *t = tasks; t; t = t->next) {
            if (t->kind == K_PROC && t->pid == pid && !t->reaped) {
                t->reaped = 1;
                t->status = status;
                t->reaped_at_ms = now_ms();
                drop_stdin(t);
                break;
            }
        }
    }
}

/* ---- payload parsing -------------------------------------------------------------------------------- */

/* Split a payload into NUL-terminated strings; -1 if the last one is not terminated. */
static int split_strings(char *p, uint32_t n, char **out, int max) {
    int count = 0;
    uint32_t i = 0;
    if (n && p[n - 1] != 0) return -1;
    while (i < n) {
        if (count == max) return -1;
        out[count++] = p + i;
        i += (uint32_t)strlen(p + i) + 1;
    }
    return count;
}

static int parse_long(const char *s, int base, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, base);
    if (errno || end == s || *end) return -1;
    *out = v;
    return 0;
}

/* ---- SPAWN ------------------------------------------------------------------------------------------ */

static const char *env_lookup(char **env, const char *key) {
    size_t kl = strlen(key);
    for (; *env; env++)
        if (!strncmp(*env, key, kl) && (*env)[kl] == '=') return *env + kl + 1;
    return NULL;
}

/* execve, and like execvp: a file without a #! line or ELF header is run by /bin/sh. Runs in the spawned child,
   which shares the agent's memory until the exec (spawn_child): no malloc, the /bin/sh argv is a static array. */
static void exec_one(const char *file, char **argv, char **env) {
    static char *sh_argv[MAX_ARGS + 3];
    execve(file, argv, env);
    if (errno != ENOEXEC) return;
    int argc = 0;
    while (argv[argc]) argc++;
    sh_argv[0] = "sh";
    sh_argv[1] = (char *)file;
    for (int i = 1; i <= argc; i++) sh_argv[i + 1] = argv[i];
    execve("/bin/sh", sh_argv, env);
    errno = ENOEXEC;
}

/* execvpe that searches the PATH of the *new* environment (glibc's uses the agent's own). */
static void exec_search(char **argv, char **env) {
    if (strchr(argv[0], '/')) {
        exec_one(argv[0], argv, env);
        return;
    }
    const char *path = env_lookup(env, "PATH");
    if (!path) path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    int saw_eacces = 0;
    char full[PATH_MAX];
    while (*path) {
        const char *colon = strchr(path, ':');
        size_t dl = colon ? (size_t)(colon - path) : strlen(path);
        if (dl == 0) {
            snprintf(full, sizeof full, "%s", argv[0]);
        } else {
            snprintf(full, sizeof full, "%.*s/%s", (int)dl, path, argv[0]);
        }
        exec_one(full, argv, env);
        if (errno == EACCES) saw_eacces = 1;
        else if (errno != ENOENT && errno != ENOTDIR) return;
        path += dl;
        if (*path == ':') path++;
    }
    errno = saw_eacces ? EACCES : ENOENT;
}

/* What a spawned child is given, and what it reports when it cannot exec (stage >= 0; -1 while it has not failed). */
typedef struct spawn_req {
    char **argv, **env;
    const char *cwd;
    const char *pty_name;   /* with a PTY: the slave the child opens as its controlling terminal */
    long uid, gid;
    int in_fd, out_fd, err_fd;
    volatile int err, stage;
} spawn_req_t;

/* The only signals whose disposition the agent changes (setup_signals): a handler would run the agent's code in
   the child before the exec, and an ignored signal would stay ignored after it, so these go back to the default. */
static const int changed_signals[] = {SIGCHLD, SIGPIPE, SIGTERM, SIGINT};

/* The spawned child: never returns. It runs in the agent's memory on a stack of its own while the agent waits
   (CLONE_VM | CLONE_VFORK, how posix_spawn starts a process): no page table is copied and no pipe is needed to
   learn that the exec failed. So it only makes system calls (ids set with raw syscalls, no libc state touched)
   and reports a failure in `req`. With a PTY the slave becomes the controlling terminal of the new session and
   stdin/stdout/stderr. */
static int spawn_child(void *arg) {
    spawn_req_t *req = arg;
    int in_fd = req->in_fd, out_fd = req->out_fd, err_fd = req->err_fd, stage = 0;
    struct sigaction dfl = {.sa_handler = SIG_DFL};
    sigemptyset(&dfl.sa_mask);
    for (size_t i = 0; i < sizeof changed_signals / sizeof *changed_signals; i++) sigaction(changed_signals[i], &dfl, NULL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    setsid();
    if (req->pty_name) {
        int slave = open(req->pty_name, O_RDWR);
        if (slave < 0 || ioctl(slave, TIOCSCTTY, 0) < 0) goto fail;
        if (req->uid >= 0 && fchown(slave, (uid_t)req->uid, (gid_t)-1) < 0) { /* the user's shell can still use it */ }
        in_fd = out_fd = err_fd = slave;
    }
    if (dup2(in_fd, 0) < 0 || dup2(out_fd, 1) < 0 || dup2(err_fd, 2) < 0) goto fail;
    stage = 2;
    if (req->gid >= 0 && (syscall(SYS_setgroups, 0, NULL) < 0 || syscall(SYS_setgid, (gid_t)req->gid) < 0)) goto fail;
    if (req->uid >= 0 && syscall(SYS_setuid, (uid_t)req->uid) < 0) goto fail;
    stage = 1;
    if (req->cwd && *req->cwd && chdir(req->cwd) < 0) goto fail;
    exec_search(req->argv, req->env);
    stage = 3;
fail:
    req->err = errno;
    req->stage = stage;
    _exit(127);
}

#define SPAWN_STACK (256 * 1024)

/* The spawned child's stack, made once, with a guard page below it so an overflow faults instead of writing over
   the agent's memory. One child runs on it at a time: the agent waits for each exec. */
static char *spawn_stack_top(void) {
    static char *top;
    if (!top) {
        size_t page = (size_t)sysconf(_SC_PAGESIZE);
        char *base = mmap(NULL, SPAWN_STACK + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
        if (base == MAP_FAILED) return NULL;
        if (mprotect(base, page, PROT_NONE) < 0) {
            munmap(base, SPAWN_STACK + page);
            return NULL;
        }
        top = base + page + SPAWN_STACK;
    }
    return top;
}

/* Start the child and return once it has exec'd or failed (req->stage). Every signal stays blocked until the
   child has reset the dispositions it inherited: no handler of the agent's may run on the child's side. */
static pid_t spawn_process(spawn_req_t *req) {
    char *stack = spawn_stack_top();
    if (!stack) return -1;
    sigset_t all, saved;
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, &saved);
    req->stage = -1;
    pid_t pid = clone(spawn_child, stack, CLONE_VM | CLONE_VFORK | SIGCHLD, req);
    int e = errno;
    sigprocmask(SIG_SETMASK, &saved, NULL);
    errno = e;
    return pid;
}

static void do_spawn(conn_t *c, uint32_t id, char *p, uint32_t n) {
    static char *fields[2 * MAX_ARGS + 16];
    char *argv[MAX_ARGS + 1], *env[MAX_ARGS + 1];
    int argc = 0, envc = 0, want_stdin = 0;
    long uid = -1, gid = -1, cols = -1, rows = -1;
    const char *cwd = NULL;
    int nf = split_strings(p, n, fields, (int)(sizeof fields / sizeof *fields));
    if (nf < 0 || nf % 2) {
        send_error(c, id, EINVAL, "malformed SPAWN payload (expected NUL-terminated key/value pairs)");
        return;
    }
    if (find_task(c, id)) {
        send_error(c, id, EINVAL, "request id %u is already in use on this connection", id);
        return;
    }
    for (int i = 0; i < nf; i += 2) {
        const char *k = fields[i];
        char *v = fields[i + 1];
        if (!strcmp(k, "arg")) {
            if (argc == MAX_ARGS) goto toomany;
            argv[argc++] = v;
        } else if (!strcmp(k, "env")) {
            if (envc == MAX_ARGS) goto toomany;
            env[envc++] = v;
        } else if (!strcmp(k, "cwd")) {
            cwd = v;
        } else if (!strcmp(k, "stdin")) {
            want_stdin = !strcmp(v, "1");
        } else if (!strcmp(k, "uid")) {
            if (parse_long(v, 10, &uid) < 0 || uid < 0) goto badnum;
        } else if (!strcmp(k, "gid")) {
            if (parse_long(v, 10, &gid) < 0 || gid < 0) goto badnum;
        } else if (!strcmp(k, "pty_cols")) {
            if (parse_long(v, 10, &cols) < 0 || cols < 1 || cols > 65535) goto badsize;
        } else if (!strcmp(k, "pty_rows")) {
            if (parse_long(v, 10, &rows) < 0 || rows < 1 || rows > 65535) goto badsize;
        } else {
            send_error(c, id, EINVAL, "unknown SPAWN key '%s'", k);
            return;
        }
    }
    if (argc == 0) {
        send_error(c, id, EINVAL, "SPAWN needs at least one 'arg'");
        return;
    }
    if ((cols < 0) != (rows < 0)) goto badsize;
    argv[argc] = NULL;
    env[envc] = NULL;

    int in_p[2] = {-1, -1}, out_p[2] = {-1, -1}, err_p[2] = {-1, -1}, master = -1;
    char pty_name[64];
    if (cols > 0) {
        /* PTY: the master is read as stdout and written as stdin (two dups, so closing stdin keeps reading) and
           kept once more for RESIZE; the child opens the slave itself, after setsid, to make it its terminal */
        struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
        master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0 ||
            ptsname_r(master, pty_name, sizeof pty_name) != 0 || ioctl(master, TIOCSWINSZ, &ws) < 0)
            goto syserr;
        if ((in_p[1] = fcntl(master, F_DUPFD_CLOEXEC, 0)) < 0 || (out_p[0] = fcntl(master, F_DUPFD_CLOEXEC, 0)) < 0)
            goto syserr;
    } else if (want_stdin) {
        if (pipe2(in_p, O_CLOEXEC) < 0) goto syserr;
    } else {
        in_p[0] = open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (in_p[0] < 0) goto syserr;
    }
    if (master < 0 && (pipe2(out_p, O_CLOEXEC) < 0 || pipe2(err_p, O_CLOEXEC) < 0)) goto syserr;
    spawn_req_t req = {
        .argv = argv, .env = env, .cwd = cwd, .pty_name = master >= 0 ? pty_name : NULL, .uid = uid, .gid = gid,
        .in_fd = in_p[0], .out_fd = out_p[1], .err_fd = err_p[1],
    };
    pid_t pid = spawn_process(&req);
    if (pid < 0) goto syserr;
    close_fd(&in_p[0]);
    close_fd(&out_p[1]);
    close_fd(&err_p[1]);
    if (req.stage >= 0) {
        /* exec failed: the child exited 127 and is reaped by reap_children as an unknown pid */
        struct { int err; int stage; } report = {req.err, req.stage};
        close_fd(&in_p[1]);
        close_fd(&out_p[0]);
        close_fd(&err_p[0]);
        close_fd(&master);
        static const char *stage[] = {"setting up stdio", "chdir", "setuid/setgid", "exec"};
        if (report.stage == 1)
            send_error(c, id, report.err, "chdir %s: %s", cwd, strerror(report.err));
        else if (report.stage == 3)
            send_error(c, id, report.err, "exec %s: %s", argv[0], strerror(report.err));
        else
            send_error(c, id, report.err, "%s for %s: %s", stage[report.stage & 3], argv[0], strerror(report.err));
        return;
    }
    task_t *t = new_task(c, id, K_PROC);
    t->pid = pid;
    t->in_fd = in_p[1];
    t->out_fd = out_p[0];
    t->err_fd = err_p[0];
    t->pty_fd = master;
    if (t->in_fd >= 0) set_nonblock(t->in_fd);
    set_nonblock(t->out_fd);
    if (t->err_fd >= 0) set_nonblock(t->err_fd);
    char num[16];
    snprintf(num, sizeof num, "%d", (int)pid);
    send_strings(c, A_SPAWNED, id, 1, num);
    return;
syserr:;
    int e = errno;
    int *fds[] = {&in_p[0], &in_p[1], &out_p[0], &out_p[1], &err_p[0], &err_p[1], &master};
    for (size_t i = 0; i < sizeof fds / sizeof *fds; i++) close_fd(fds[i]);
    send_error(c, id, e, "cannot start %s: %s", argv[0], strerror(e));
    return;
toomany:
    send_error(c, id, E2BIG, "more than %d arguments or environment entries", MAX_ARGS);
    return;
badnum:
    send_error(c, id, EINVAL, "uid/gid must be a non-negative decimal number");
    return;
badsize:
    send_error(c, id, EINVAL, "a PTY needs both pty_cols and pty_rows, each 1-65535");
}

static void flush_stdin(task_t *t) {
    if (t->in_fd < 0) return;
    if (buf_flush(&t->in, t->in_fd) < 0) {
        drop_stdin(t);   /* EPIPE: the process closed its stdin; the rest is discarded */
        return;
    }
    if (t->in_eof_pending && !buf_size(&t->in)) drop_stdin(t);
}

/* ---- files ------------------------------------------------------------------------------------------ */

static const char *type_name(mode_t m) {
    if (S_ISREG(m)) return "file";
    if (S_ISDIR(m)) return "dir";
    if (S_ISLNK(m)) return "symlink";
    return "other";
}

static void send_entry(conn_t *c, uint32_t id, const char *name, const struct stat *st) {
    char size[32], mode[16], mtime[48];
    snprintf(size, sizeof size, "%lld", (long long)st->st_size);
    snprintf(mode, sizeof mode, "%o", (unsigned)(st->st_mode & 07777));
    snprintf(mtime, sizeof mtime, "%lld.%09ld", (long long)st->st_mtim.tv_sec, st->st_mtim.tv_nsec);
    send_strings(c, A_ENTRY, id, 5, name, type_name(st->st_mode), size, mode, mtime);
}

static int one_path(conn_t *c, uint32_t id, char *p, uint32_t n, const char *what, char **path) {
    char *f[1];
    if (split_strings(p, n, f, 1) != 1 || !*f[0]) {
        send_error(c, id, EINVAL, "%s needs exactly one non-empty path", what);
        return -1;
    }
    *path = f[0];
    return 0;
}

static void do_stat(conn_t *c, uint32_t id, char *p, uint32_t n) {
    char *path;
    struct stat st;
    if (one_path(c, id, p, n, "STAT", &path) < 0) return;
    if (lstat(path, &st) < 0) {
        send_error(c, id, errno, "stat %s: %s", path, strerror(errno));
        return;
    }
    send_entry(c, id, path, &st);
}

static void do_read_file(conn_t *c, uint32_t id, char *p, uint32_t n) {
    char *path;
    struct stat st;
    if (one_path(c, id, p, n, "READ_FILE", &path) < 0) return;
    if (find_task(c, id)) {
        send_error(c, id, EINVAL, "request id %u is already in use on this connection", id);
        return;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        send_error(c, id, errno, "read %s: %s", path, strerror(errno));
        return;
    }
    if (fstat(fd, &st) < 0) {
        int e = errno;
        close(fd);
        send_error(c, id, e, "read %s: %s", path, strerror(e));
        return;
    }
    if (!S_ISREG(st.st_mode)) {
        int e = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
        close(fd);
        send_error(c, id, e, "read %s: %s", path, e == EISDIR ? "is a directory" : "not a regular file");
        return;
    }
    task_t *t = new_task(c, id, K_READ);
    t->file_fd = fd;
}

/* Produce the next chunk of a READ_FILE; returns 1 if the task is finished. */
static int pump_read(task_t *t) {
    static char chunk[CHUNK];
    ssize_t r;
    do {
        r = read(t->file_fd, chunk, sizeof chunk);
    } while (r < 0 && errno == EINTR);
    if (r > 0) {
        send_frame(t->conn, A_DATA, t->id, chunk, (size_t)r);
        return 0;
    }
    if (r < 0) send_error(t->conn, t->id, errno, "read: %s", strerror(errno));
    else send_frame(t->conn, A_END, t->id, NULL, 0);
    free_task(t);
    return 1;
}

static int mkdir_parents(char *path) {
    for (char *s = path + 1; *s; s++) {
        if (*s != '/') continue;
        *s = 0;
        int rc = mkdir(path, 0755);
        int e = errno;
        *s = '/';
        if (rc < 0 && e != EEXIST) {
            errno = e;
            return -1;
        }
    }
    return 0;
}

static void do_write_file(conn_t *c, uint32_t id, char *p, uint32_t n) {
    char *f[3];
    long mode;
    if (split_strings(p, n, f, 3) != 3 || !*f[0] || parse_long(f[1], 8, &mode) < 0 || mode < 0 || mode > 07777) {
        send_error(c, id, EINVAL, "WRITE_FILE needs path, octal mode, make_parents");
        return;
    }
    if (find_task(c, id)) {
        send_error(c, id, EINVAL, "request id %u is already in use on this connection", id);
        return;
    }
    task_t *t = new_task(c, id, K_WRITE);
    if (!strcmp(f[2], "1") && mkdir_parents(f[0]) < 0) {
        t->write_errno = errno;
        return;
    }
    t->file_fd = open(f[0], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, (mode_t)mode);
    if (t->file_fd < 0 || fchmod(t->file_fd, (mode_t)mode) < 0) t->write_errno = errno;
}

static void write_file_data(task_t *t, const char *p, uint32_t n) {
    while (n && !t->write_errno) {
        ssize_t w = write(t->file_fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            t->write_errno = errno;
            return;
        }
        p += w;
        n -= (uint32_t)w;
        t->written += w;
    }
}

static void finish_write(task_t *t) {
    if (!t->write_errno && t->file_fd >= 0 && close(t->file_fd) < 0) t->write_errno = errno;
    t->file_fd = -1;
    if (t->write_errno) {
        send_error(t->conn, t->id, t->write_errno, "write: %s", strerror(t->write_errno));
    } else {
        char num[32];
        snprintf(num, sizeof num, "%lld", t->written);
        send_strings(t->conn, A_OK, t->id, 1, num);
    }
    free_task(t);
}

/* ---- filesystem operations and directory watches (MKDIR, MOVE, REMOVE, STATX, LIST_DIRX, CHOWN, WATCH) -- */
/* Why in the agent: these run inside the sandbox's root like every other file op, so `..` and symlinks
   cannot leave it, and they behave the same on every substrate. */

#include <sys/inotify.h>

enum {
    H_MKDIR = 0x14, H_MOVE = 0x15, H_REMOVE = 0x16, H_STATX = 0x17, H_LIST_DIRX = 0x18, H_CHOWN = 0x19,
    H_WATCH = 0x1A, H_CANCEL = 0x1B, H_DETACH = 0x1C, H_ATTACH = 0x1D,
    A_EVENT = 0x89,
};
enum { K_WATCH = 16 };
enum { P_WATCH = 64 };
#define WATCH_MAX_DIRS 8192      /* recursive watches stop adding directories past this many */
#define WATCH_MASK (IN_CREATE | IN_MOVED_TO | IN_MODIFY | IN_DELETE | IN_MOVED_FROM | IN_ATTRIB | IN_DELETE_SELF \
                    | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW)

typedef struct watch {
    task_t *task;            /* the K_WATCH task whose file_fd is the inotify fd */
    char *root;
    int recursive;
    int root_wd;
    int n, cap;
    int *wds;
    char **rels;             /* path of each watched directory relative to root ("" = root) */
    struct watch *next;
} watch_t;

static watch_t *watches;

static watch_t *watch_of(task_t *t) {
    for (watch_t *w = watches; w; w = w->next)
        if (w->task == t) return w;
    return NULL;
}

static void watch_forget(task_t *t) {
    for (watch_t **p = &watches; *p; p = &(*p)->next) {
        watch_t *w = *p;
        if (w->task != t) continue;
        *p = w->next;
        for (int i = 0; i < w->n; i++) free(w->rels[i]);
        free(w->rels);
        free(w->wds);
        free(w->root);
        free(w);
        return;
    }
}

static int parse_id(const char *s, long *out) {
    return parse_long(s, 10, out) < 0 || *out < -1 ? -1 : 0;
}

static void maybe_chown(const char *path, long uid, long gid) {
    if (uid >= 0 || gid >= 0)
        if (lchown(path, (uid_t)uid, (gid_t)gid) < 0) { /* best effort: the entry exists either way */ }
}

/* mkdir -p of every component before `end` (exclusive); new directories get uid/gid. */
static int make_parents_owned(char *path, char *end, long uid, long gid) {
    for (char *s = path + 1; s < end; s++) {
        if (*s != '/') continue;
        *s = 0;
        int rc = mkdir(path, 0755);
        int e = errno;
        if (rc == 0) maybe_chown(path, uid, gid);
        *s = '/';
        if (rc < 0 && e != EEXIST) {
            errno = e;
            return -1;
        }
    }
    return 0;
}

static void do_mkdir(conn_t *c, uint32_t id, char *p, uint32_t n) {
    char *f[5];
    long mode, uid, gid;
    if (split_strings(p, n, f, 5) != 5 || !*f[0] || parse_long(f[1], 8, &mode) < 0 || mode < 0 || mode > 07777 ||
        parse_id(f[3], &uid) < 0 || parse_id(f[4], &gid) < 0) {
        send_error(c, id, EINVAL, "MKDIR needs path, octal mode, parents, uid, gid");
        return;
    }
    char *path = f[0];
    size_t len = strlen(path);
    while (len > 1 && path[len - 1] == '/') path[--len] = 0;
    if (!strcmp(f[2], "1") && make_parents_owned(path, path + len, uid, gid) < 0) {
        send_error(c, id, errno, "mkdir %s: %s", path, strerror(errno));
        return;
    }
    if (mkdir(path, (mode_t)mode) < 0) {
        int e = errno;
        struct stat st;
        if (e == EEXIST && stat(path, &st) == 0 && !S_ISDIR(st.st_mode)) e = ENOTDIR;
        send_error(c, id, e, "mkdir %s: %s", path, e == ENOTDIR ? "exists and is not a directory" : strerror(e));
        return;
    }
    if (chmod(path, (mode_t)mode) < 0) { /* umask only narrowed it; keep what mkdir made */ }
    maybe_chown(path, uid, gid);
    send_strings(c, A_OK, id, 1, "1");
}

static void do_move(conn_t *c, uint32_t id, char *p, uint32_t n) {
    char *f[5];
    long uid, gid;
    if (split_strings(p, n, f, 5) != 5 || !*f[0] || !*f[1] || parse_id(f[3], &uid) < 0 || parse_id(f[4], &gid) < 0) {
        send_error(c, id, EINVAL, "MOVE needs source, destination, make_parents, uid, gid");
        return;
    }
    char *slash = strrchr(f[1], '/');
    if (!strcmp(f[2], "1") && slash && slash != f[1] && make_parents_owned(f[1], slash + 1, uid, gid) < 0) {
        send_error(c, id, errno, "move to %s: %s", f[1], strerror(errno));
        return;
    }
    if (rename(f[0], f[1]) < 0) {
        send_error(c, id, errno, "move %s to %s: %s", f[0], f[1], strerror(errno));
        return;
    }
    send_strings(c, A_OK, id, 1, "0");
}

/* Remove `name` under `dirfd` and, for a directory, everything below it; symlinks are removed, never followed. */
static int remove_tree(int dirfd, const char *name, int depth) {
    struct stat st;
    if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0) return -1;
    if (!S_ISDIR(st.st_mode)) return unlinkat(dirfd, name, 0);
    if (depth > 4096) {
        errno = ELOOP;
        return -1;
    }
    int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return -1;
    DIR *d = fdopendir(fd);
    if (!d) {
        close(fd);
        return -1;
    }
    int rc = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        if (remove_tree(fd, de->d_name, depth + 1) < 0 && errno != ENOENT) {
            rc = -1;
            break;
        }
    }
    int e = errno;
    closedir(d);
    if (rc < 0) {
        errno = e;
        return -1;
    }
    return unlinkat(dirfd, name, AT_REMOVEDIR);
}

static void do_remove(conn_t *c, uint32_t id, char *p, uint32_t n) {
    char *f[2];
    if (split_strings(p, n, f, 2) != 2 || !*f[0]) {
        send_error(c, id, EINVAL, "REMOVE needs path, recursive");
        return;
    }
    if (!strcmp(f[0], "/")) {
        send_error(c, id, EBUSY, "remove /: refusing to remove the sandbox root");
        return;
    }
    int rc;
    if (!strcmp(f[1], "1")) {
        rc = remove_tree(AT_FDCWD, f[0], 0);
    } else {
        struct stat st;
        rc = lstat(f[0], &st);
        if (rc == 0) rc = S_ISDIR(st.st_mode) ? rmdir(f[0]) : unlink(f[0]);
    }
    if (rc < 0) {
        send_error(c, id, errno, "remove %s: %s", f[0], strerror(errno));
        return;
    }
    send_strings(c, A_OK, id, 1, "0");
}

/* ENTRY with three more fields: uid, gid, symlink target ("" when not a symlink). */
static void send_entry_x(conn_t *c, uint32_t id, int dirfd, const char *name, const char *shown, const struct stat *st) {
    char size[32], mode[16], mtime[48], uid[16], gid[16], target[PATH_MAX];
    target[0] = 0;
    if (S_ISLNK(st->st_mode)) {
        ssize_t l = readlinkat(dirfd, name, target, sizeof target - 1);
        target[l > 0 ? l : 0] = 0;
    }
    snprintf(size, sizeof size, "%lld", (long long)st->st_size);
    snprintf(mode, sizeof mode, "%o", (unsigned)(st->st_mode & 07777));
    snprintf(mtime, sizeof mtime, "%lld.%09ld", (long long)st->st_mtim.tv_sec, st->st_mtim.tv_nsec);
    snprintf(uid, sizeof uid, "%u", (unsigned)st->st_uid);
    snprintf(gid, sizeof gid, "%u", (unsigned)st->st_gid);
    send_strings(c, A_ENTRY, id, 8, shown, type_name(st->st_mode), size, mode, mtime, uid, gid, target);
}

static void do_statx(conn_t *c, uint32_t id, char *p, uint32_t n) {
    char *path;
    struct stat st;
    if (one_path(c, id, p, n, "STATX", &path) < 0) return;
    if (lstat(path, &st) < 0) {
        send_error(c, id, errno, "stat %s: %s", path, strerror(errno));
        return;
    }
    send_entry_x(c, id, AT_FDCWD, path, path, &st);
}

/* LIST_DIR and LIST_DIRX: one ENTRY per directory entry (LIST_DIRX's with owners and link targets), then END */
static void do_list_dir(conn_t *c, uint32_t id, char *p, uint32_t n, int extended) {
    char *path;
    if (one_path(c, id, p, n, extended ? "LIST_DIRX" : "LIST_DIR", &path) < 0) return;
    int dfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = dfd < 0 ? NULL : fdopendir(dfd);
    if (!d) {
        int e = errno;
        if (dfd >= 0) close(dfd);
        send_error(c, id, e, "list %s: %s", path, strerror(e));
        return;
    }
    struct dirent *de;
    while ((de = readdir(d))) {
        struct stat st;
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        if (fstatat(dfd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0) continue;  /* removed meanwhile */
        if (extended) send_entry_x(c, id, dfd, de->d_name, de->d_name, &st);
        else send_entry(c, id, de->d_name, &st);
    }
    closedir(d);
    send_frame(c, A_END, id, NULL, 0);
}

static void do_chown(conn_t *c, uint32_t id, char *p, uint32_t n) {
    char *f[3];
    long uid, gid;
    if (split_strings(p, n, f, 3) != 3 || !*f[0] || parse_id(f[1], &uid) < 0 || parse_id(f[2], &gid) < 0) {
        send_error(c, id, EINVAL, "CHOWN needs path, uid, gid");
        return;
    }
    if (lchown(f[0], (uid_t)uid, (gid_t)gid) < 0) {
        send_error(c, id, errno, "chown %s: %s", f[0], strerror(errno));
        return;
    }
    send_strings(c, A_OK, id, 1, "0");
}

static void watch_add_dir(watch_t *w, const char *rel, int depth) {
    if (w->n >= WATCH_MAX_DIRS) return;
    char full[PATH_MAX];
    if (*rel) snprintf(full, sizeof full, "%s/%s", w->root, rel);
    else snprintf(full, sizeof full, "%s", w->root);
    int wd = inotify_add_watch(w->task->file_fd, full, WATCH_MASK);
    if (wd < 0) return;
    int known = 0;
    for (int i = 0; i < w->n; i++) {
        if (w->wds[i] == wd) {  /* the same directory again (e.g. moved back): refresh its name */
            free(w->rels[i]);
            w->rels[i] = strdup(rel);
            known = 1;
        }
    }
    if (!known) {
        if (w->n == w->cap) {
            w->cap = w->cap ? w->cap * 2 : 16;
            w->wds = xrealloc(w->wds, (size_t)w->cap * sizeof *w->wds);
            w->rels = xrealloc(w->rels, (size_t)w->cap * sizeof *w->rels);
        }
        w->wds[w->n] = wd;
        w->rels[w->n] = strdup(rel);
        w->n++;
    }
    if (!w->recursive || depth > 64) return;
    DIR *d = opendir(full);
    if (!d) return;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        struct stat st;
        if (fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0 || !S_ISDIR(st.st_mode)) continue;
        char sub[PATH_MAX];
        if (*rel) snprintf(sub, sizeof sub, "%s/%s", rel, de->d_name);
        else snprintf(sub, sizeof sub, "%s", de->d_name);
        watch_add_dir(w, sub, depth + 1);
    }
    closedir(d);
}

static void do_watch(conn_t *c, uint32_t id, char *p, uint32_t n) {
    char *f[2];
    struct stat st;
    if (split_strings(p, n, f, 2) != 2 || !*f[0]) {
        send_error(c, id, EINVAL, "WATCH needs path, recursive");
        return;
    }
    if (find_task(c, id)) {
        send_error(c, id, EINVAL, "request id %u is already in use on this connection", id);
        return;
    }
    if (stat(f[0], &st) < 0) {
        send_error(c, id, errno, "watch %s: %s", f[0], strerror(errno));
        return;
    }
    if (!S_ISDIR(st.st_mode)) {
        send_error(c, id, ENOTDIR, "watch %s: not a directory", f[0]);
        return;
    }
    int fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (fd < 0) {
        send_error(c, id, errno, "watch %s: inotify: %s", f[0], strerror(errno));
        return;
    }
    task_t *t = new_task(c, id, K_WATCH);
    t->file_fd = fd;
    watch_t *w = calloc(1, sizeof *w);
    if (!w) die("calloc");
    w->task = t;
    w->root = strdup(f[0]);
    w->recursive = !strcmp(f[1], "1");
    w->next = watches;
    watches = w;
    watch_add_dir(w, "", 0);
    if (w->n == 0) {
        int e = errno;
        send_error(c, id, e, "watch %s: %s", f[0], strerror(e));
        free_task(t);
        return;
    }
    w->root_wd = w->wds[0];
    send_strings(c, A_OK, id, 1, "0");
}

static void watch_drop_wd(watch_t *w, int wd) {
    for (int i = 0; i < w->n; i++) {
        if (w->wds[i] != wd) continue;
        free(w->rels[i]);
        w->wds[i] = w->wds[w->n - 1];
        w->rels[i] = w->rels[w->n - 1];
        w->n--;
        return;
    }
}

/* Read what inotify queued and send one EVENT (kind, name relative to the root) per change; returns 1 when the
   watched directory itself is gone (the watch then ends with END). */
static int pump_watch(task_t *t) {
    watch_t *w = watch_of(t);
    char ev_buf[16384] __attribute__((aligned(__alignof__(struct inotify_event))));
    if (!w) return 1;
    for (;;) {
        ssize_t r = read(t->file_fd, ev_buf, sizeof ev_buf);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return 0;
        for (char *q = ev_buf; q < ev_buf + r;) {
            struct inotify_event *ev = (struct inotify_event *)q;
            q += sizeof *ev + ev->len;
            const char *rel = NULL;
            for (int i = 0; i < w->n; i++)
                if (w->wds[i] == ev->wd) rel = w->rels[i];
            if (ev->mask & IN_IGNORED) {
                int was_root = ev->wd == w->root_wd;
                watch_drop_wd(w, ev->wd);
                if (was_root) return 1;
                continue;
            }
            if (!rel || !ev->len) continue;  /* events about a watched directory itself: its parent reports them */
            char name[PATH_MAX];
            if (*rel) snprintf(name, sizeof name, "%s/%s", rel, ev->name);
            else snprintf(name, sizeof name, "%s", ev->name);
            const char *kind = NULL;
            if (ev->mask & (IN_CREATE | IN_MOVED_TO)) kind = "create";
            else if (ev->mask & IN_MODIFY) kind = "write";
            else if (ev->mask & IN_DELETE) kind = "remove";
            else if (ev->mask & IN_MOVED_FROM) kind = "rename";
            else if (ev->mask & IN_ATTRIB) kind = "chmod";
            if (!kind) continue;
            send_strings(t->conn, A_EVENT, t->id, 2, kind, name);
            if (w->recursive && (ev->mask & (IN_CREATE | IN_MOVED_TO)) && (ev->mask & IN_ISDIR)) watch_add_dir(w, name, 0);
        }
        if (buf_size(&t->conn->out) >= OUT_HIGH) return 0;  /* backpressure: the rest waits in the kernel */
    }
}

static void finish_watch(task_t *t) {
    send_frame(t->conn, A_END, t->id, NULL, 0);
    free_task(t);
}

/* CANCEL ends a WATCH (reply END); for any other id it is ignored (it raced with the request's end). */
static void do_cancel(conn_t *c, uint32_t id) {
    task_t *t = find_task(c, id);
    if (t && t->kind == K_WATCH) finish_watch(t);
}

/* ---- end of filesystem operations ------------------------------------------------------------------- */

/* ---- dispatch --------------------------------------------------------------------------------------- */

static void handle_frame(conn_t *c, int type, uint32_t id, char *p, uint32_t n) {
    task_t *t;
    switch (type) {
    case H_SPAWN: do_spawn(c, id, p, n); break;
    case H_STDIN:
        t = find_task(c, id);
        if (t && t->kind == K_WRITE) {
            write_file_data(t, p, n);
        } else if (t && t->kind == K_PROC && t->in_fd >= 0 && !t->in_eof_pending) {
            buf_append(&t->in, p, n);
            flush_stdin(t);
            if (t->in_fd >= 0 && buf_size(&t->in) > STDIN_MAX) {
                drop_stdin(t);
                send_error(c, id, ENOBUFS, "process %d left more than %u bytes of stdin unread; its stdin was closed",
                           (int)t->pid, STDIN_MAX);
            }
        }
        break;  /* stdin for a finished process is dropped: it raced with the exit */
    case H_STDIN_EOF:
        t = find_task(c, id);
        if (t && t->kind == K_WRITE) {
            finish_write(t);
        } else if (t && t->kind == K_PROC) {
            t->in_eof_pending = 1;
            flush_stdin(t);
        }
        break;
    case H_SIGNAL: {
        /* the process group by default (so `sh -c` children die too); scope "pid": the process alone */
        char *f[2] = {NULL, NULL};
        long sig;
        int nf = split_strings(p, n, f, 2);
        if (nf < 1 || parse_long(f[0], 10, &sig) < 0 || sig < 0 || sig >= NSIG ||
            (nf == 2 && strcmp(f[1], "pid") && strcmp(f[1], "group"))) {
            send_error(c, id, EINVAL, "SIGNAL needs a decimal signal number and optionally the scope pid|group");
            break;
        }
        t = find_task(c, id);
        if (t && t->kind == K_PROC && !t->reaped) kill(nf == 2 && !strcmp(f[1], "pid") ? t->pid : -t->pid, (int)sig);
        break;
    }
    case H_RESIZE: {
        char *f[2];
        long cols, rows;
        if (split_strings(p, n, f, 2) != 2 || parse_long(f[0], 10, &cols) < 0 || parse_long(f[1], 10, &rows) < 0 ||
            cols < 1 || cols > 65535 || rows < 1 || rows > 65535) {
            send_error(c, id, EINVAL, "RESIZE needs cols and rows, each 1-65535");
            break;
        }
        t = find_task(c, id);
        if (t && t->kind == K_PROC && t->pty_fd >= 0) {
            /* the kernel sends SIGWINCH to the terminal's foreground process group */
            struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
            if (ioctl(t->pty_fd, TIOCSWINSZ, &ws) < 0) { /* the terminal is gone: raced with the exit */ }
        }
        break;
    }
    case H_READ_FILE: do_read_file(c, id, p, n); break;
    case H_WRITE_FILE: do_write_file(c, id, p, n); break;
    case H_LIST_DIR: do_list_dir(c, id, p, n, 0); break;
    case H_STAT: do_stat(c, id, p, n); break;
    case H_PING: send_frame(c, A_PONG, id, p, n); break;
    case H_MKDIR: do_mkdir(c, id, p, n); break;
    case H_MOVE: do_move(c, id, p, n); break;
    case H_REMOVE: do_remove(c, id, p, n); break;
    case H_STATX: do_statx(c, id, p, n); break;
    case H_LIST_DIRX: do_list_dir(c, id, p, n, 1); break;
    case H_CHOWN: do_chown(c, id, p, n); break;
    case H_WATCH: do_watch(c, id, p, n); break;
    case H_CANCEL: do_cancel(c, id); break;
    case H_DETACH:
        /* the host is about to close this connection to checkpoint the sandbox: keep what it started */
        for (t = tasks; t; t = t->next)
            if (t->conn == c) t->conn = &parked;
        send_frame(c, A_OK, id, NULL, 0);
        break;
    case H_ATTACH:
        for (t = tasks; t; t = t->next)
            if (t->conn == &parked) t->conn = c;
        send_frame(c, A_OK, id, NULL, 0);
        break;
    default: send_error(c, id, EINVAL, "unknown frame type 0x%02x", type);
    }
}

/* ---- connections ------------------------------------------------------------------------------------ */

static conn_t *new_conn(int in_fd, int out_fd, int is_device) {
    conn_t *c = calloc(1, sizeof *c);
    if (!c) die("calloc");
    c->in_fd = in_fd;
    c->out_fd = out_fd;
    c->is_device = is_device;
    set_nonblock(in_fd);
    if (out_fd != in_fd) set_nonblock(out_fd);
    c->next = conns;
    conns = c;
    return c;
}

/* The host went away: kill what it started (process groups), drop its transfers. */
static void drop_conn(conn_t *c) {
    c->dead = 1;
    for (task_t *t = tasks, *next; t; t = next) {
        next = t->next;
        if (t->conn != c) continue;
        if (t->kind == K_PROC && !t->reaped) kill(-t->pid, SIGKILL);
        if (t->kind == K_WRITE && t->file_fd >= 0) close_fd(&t->file_fd);
        t->conn = NULL;
        free_task(t);
    }
    if (c->in_fd >= 0) close(c->in_fd);
    if (c->out_fd >= 0 && c->out_fd != c->in_fd) close(c->out_fd);
    c->in_fd = c->out_fd = -1;
    free(c->payload);
    buf_free(&c->out);
    for (conn_t **p = &conns; *p; p = &(*p)->next) {
        if (*p == c) {
            *p = c->next;
            break;
        }
    }
    if (c->is_device) device_retry_at_ms = now_ms() + REOPEN_DELAY_MS;
    free(c);
    if (fd_mode && !conns) {
        reap_children();
        exit(0);
    }
}

/* Read and dispatch what the host sent; returns -1 when the connection must be dropped. */
static int conn_read(conn_t *c) {
    static char rbuf[4 * CHUNK];
    ssize_t r;
    do {
        r = read(c->in_fd, rbuf, sizeof rbuf);
    } while (r < 0 && errno == EINTR);
    if (r < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
    if (r == 0) return -1;
    size_t i = 0;
    while (i < (size_t)r && !c->dead) {
        if (!c->in_payload) {
            size_t take = HDR - c->hdr_got;
            if (take > (size_t)r - i) take = (size_t)r - i;
            memcpy(c->hdr + c->hdr_got, rbuf + i, take);
            c->hdr_got += take;
            i += take;
            if (c->hdr_got < HDR) break;
            unsigned char *h = (unsigned char *)c->hdr;
            uint32_t len = (uint32_t)h[5] << 24 | (uint32_t)h[6] << 16 | (uint32_t)h[7] << 8 | h[8];
            if (len > MAX_PAYLOAD) {
                uint32_t id = (uint32_t)h[1] << 24 | (uint32_t)h[2] << 16 | (uint32_t)h[3] << 8 | h[4];
                send_error(c, id, EMSGSIZE, "frame payload of %u bytes exceeds the %u byte limit; closing", len, MAX_PAYLOAD);
                buf_flush(&c->out, c->out_fd);
                return -1;
            }
            c->want = len;
            c->got = 0;
            c->in_payload = 1;
            c->payload = xrealloc(c->payload, len + 1);
        }
        size_t take = c->want - c->got;
        if (take > (size_t)r - i) take = (size_t)r - i;
        memcpy(c->payload + c->got, rbuf + i, take);
        c->got += (uint32_t)take;
        i += take;
        if (c->got < c->want) break;
        unsigned char *h = (unsigned char *)c->hdr;
        uint32_t id = (uint32_t)h[1] << 24 | (uint32_t)h[2] << 16 | (uint32_t)h[3] << 8 | h[4];
        c->payload[c->want] = 0;
        c->in_payload = 0;
        c->hdr_got = 0;
        handle_frame(c, h[0], id, c->payload, c->want);
    }
    return 0;
}

static void open_device(void) {
    int fd = open(device_path, O_RDWR | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        device_retry_at_ms = now_ms() + REOPEN_DELAY_MS;
        return;
    }
    device_retry_at_ms = -1;
    struct termios tio;
    if (tcgetattr(fd, &tio) == 0) {
        /* a console-style port (hvc, pty): binary frames must pass untouched by the line discipline */
        cfmakeraw(&tio);
        tcsetattr(fd, TCSANOW, &tio);
    }
    new_conn(fd, fd, 1);
}

static int open_listener(const char *path) {
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof a.sun_path) {
        errno = ENAMETOOLONG;
        die(path);
    }
    strcpy(a.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) die("socket");
    unlink(path);
    /* bind to a temporary name and rename it in place, so a host polling for the path never sees a socket
       that is not listening yet */
    struct sockaddr_un tmp = a;
    if (snprintf(tmp.sun_path, sizeof tmp.sun_path, "%s.tmp", path) >= (int)sizeof tmp.sun_path) tmp = a;
    unlink(tmp.sun_path);
    if (bind(fd, (struct sockaddr *)&tmp, sizeof tmp) < 0) die("bind");
    if (listen(fd, 64) < 0) die("listen");
    if (strcmp(tmp.sun_path, a.sun_path) && rename(tmp.sun_path, a.sun_path) < 0) die("rename");
    return fd;
}

/* ---- signals ---------------------------------------------------------------------------------------- */

static void on_signal(int sig) {
    int saved = errno;
    if (sig == SIGTERM || sig == SIGINT) got_term = 1;
    char b = 0;
    if (write(sig_pipe[1], &b, 1) < 0) { /* the pipe is full: a wakeup is already pending */ }
    errno = saved;
}

static void setup_signals(int exit_on_term) {
    if (pipe2(sig_pipe, O_CLOEXEC | O_NONBLOCK) < 0) die("pipe");
    struct sigaction sa = {.sa_handler = on_signal, .sa_flags = SA_RESTART | SA_NOCLDSTOP};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGCHLD, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    if (getpid() == 1 && !exit_on_term) {
        /* PID 1: the sandbox dies when the runtime kills it with SIGKILL, not on a stray TERM/INT */
        signal(SIGTERM, SIG_IGN);
        signal(SIGINT, SIG_IGN);
    } else {
        sigaction(SIGTERM, &sa, NULL);
        sigaction(SIGINT, &sa, NULL);
    }
}

static void shutdown_all(void) {
    for (task_t *t = tasks; t; t = t->next)
        if (t->kind == K_PROC && !t->reaped) kill(-t->pid, SIGKILL);
    if (listen_fd >= 0) close(listen_fd);
    exit(0);
}

/* ---- main loop -------------------------------------------------------------------------------------- */

enum { P_SIG, P_LISTEN, P_CONN_IN, P_CONN_OUT, P_OUT, P_ERR, P_STDIN };

static void usage(void) {
    fprintf(stderr, "usage: dsec-agent (--listen SOCKET | --fd N | --device PATH) [--exit-on-term]\n"
                    "  --exit-on-term  also as PID 1, SIGTERM/SIGINT kill every process group and exit\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *listen_path = NULL;
    int fd = -1, exit_on_term = 0;
    for (int i = 1; i < argc; i++) {
        long v;
        if (!strcmp(argv[i], "--listen") && i + 1 < argc) listen_path = argv[++i];
        else if (!strcmp(argv[i], "--fd") && i + 1 < argc && parse_long(argv[i + 1], 10, &v) == 0 && v >= 0 && v < INT_MAX)
            fd = (int)v, i++;
        else if (!strcmp(argv[i], "--exit-on-term")) exit_on_term = 1;
        else if (!strcmp(argv[i], "--device") && i + 1 < argc) device_path = argv[++i];
        else usage();
    }
    if (!!listen_path + (fd >= 0) + !!device_path != 1) usage();
    setup_signals(exit_on_term);
    if (listen_path) {
        listen_fd = open_listener(listen_path);
    } else if (fd >= 0) {
        if (fcntl(fd, F_GETFD) < 0) die("--fd");
        fcntl(fd, F_SETFD, FD_CLOEXEC);
        fd_mode = 1;
        new_conn(fd, fd, 0);
    } else {
        open_device();
    }

    struct pollfd *pfd = NULL;
    void **owner = NULL;
    int *role = NULL;
    size_t cap = 0;
    for (;;) {
        if (got_term) shutdown_all();
        size_t n = 0, need = 2;
        for (conn_t *c = conns; c; c = c->next) need += 2;
        for (task_t *t = tasks; t; t = t->next) need += 3;
        if (need > cap) {
            cap = need * 2;
            pfd = xrealloc(pfd, cap * sizeof *pfd);
            owner = xrealloc(owner, cap * sizeof *owner);
            role = xrealloc(role, cap * sizeof *role);
        }
#define ADD(f, ev, o, r) do { pfd[n].fd = (f); pfd[n].events = (ev); pfd[n].revents = 0; owner[n] = (o); role[n] = (r); n++; } while (0)
        ADD(sig_pipe[0], POLLIN, NULL, P_SIG);
        if (listen_fd >= 0) ADD(listen_fd, POLLIN, NULL, P_LISTEN);
        int timeout = -1;
        long long now = now_ms();
        for (conn_t *c = conns; c; c = c->next) {
            ADD(c->in_fd, POLLIN, c, P_CONN_IN);
            if (buf_size(&c->out)) ADD(c->out_fd, POLLOUT, c, P_CONN_OUT);
        }
        for (task_t *t = tasks; t; t = t->next) {
            int room = !t->conn->dead && buf_size(&t->conn->out) < OUT_HIGH;
            if (t->kind == K_PROC) {
                if (room && t->out_fd >= 0) ADD(t->out_fd, POLLIN, t, P_OUT);
                if (room && t->err_fd >= 0) ADD(t->err_fd, POLLIN, t, P_ERR);
                if (t->in_fd >= 0 && buf_size(&t->in)) ADD(t->in_fd, POLLOUT, t, P_STDIN);
                if (t->reaped) {
                    long long left = t->reaped_at_ms + EXIT_GRACE_MS - now;
                    if (left < 0) left = 0;
                    if (timeout < 0 || left < timeout) timeout = (int)left + 1;
                }
            } else if (t->kind == K_READ && room) {
                timeout = 0;   /* regular files are always readable: pump one chunk per round */
            } else if (t->kind == K_WATCH && room) {
                ADD(t->file_fd, POLLIN, t, P_WATCH);
            }
        }
        if (device_path && device_retry_at_ms >= 0) {
            long long left = device_retry_at_ms - now;
            if (left < 0) left = 0;
            if (timeout < 0 || left < timeout) timeout = (int)left;
        }
        int rc = poll(pfd, n, timeout);
        if (rc < 0 && errno != EINTR) die("poll");

        if (rc > 0) {
            for (size_t i = 0; i < n; i++) {
                short ev = pfd[i].revents;
                if (!ev) continue;
                if (role[i] == P_SIG) {
                    char drain[64];
                    while (read(sig_pipe[0], drain, sizeof drain) > 0) {}
                    reap_children();
                } else if (role[i] == P_LISTEN) {
                    int cfd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
                    if (cfd >= 0) {
                        int count = 0;
                        for (conn_t *c = conns; c; c = c->next) count++;
                        if (count >= MAX_CONNS) close(cfd);
                        else new_conn(cfd, cfd, 0);
                    }
                }
            }
            /* connections and tasks may be freed while handling events: look each owner up again */
            for (size_t i = 0; i < n; i++) {
                short ev = pfd[i].revents;
                if (!ev || role[i] == P_SIG || role[i] == P_LISTEN) continue;
                if (role[i] == P_CONN_IN || role[i] == P_CONN_OUT) {
                    conn_t *c;
                    for (c = conns; c && c != owner[i]; c = c->next) {}
                    if (!c || c->in_fd != pfd[i].fd) continue;
                    if (role[i] == P_CONN_IN) {
                        if ((ev & (POLLIN | POLLHUP | POLLERR)) && conn_read(c) < 0) drop_conn(c);
                    } else if (buf_flush(&c->out, c->out_fd) < 0) {
                        drop_conn(c);
                    }
                    continue;
                }
                task_t *t;
                for (t = tasks; t && t != owner[i]; t = t->next) {}
                if (!t) continue;
                if (role[i] == P_STDIN) {
                    if (t->in_fd == pfd[i].fd) flush_stdin(t);
                    continue;
                }
                if (role[i] == P_WATCH) {
                    if (t->file_fd == pfd[i].fd && pump_watch(t)) finish_watch(t);
                    continue;
                }
                int *fdp = role[i] == P_OUT ? &t->out_fd : &t->err_fd;
                if (*fdp != pfd[i].fd) continue;
                char chunk[CHUNK];
                ssize_t r = read(*fdp, chunk, sizeof chunk);
                if (r > 0) send_frame(t->conn, role[i] == P_OUT ? A_STDOUT : A_STDERR, t->id, chunk, (size_t)r);
                else if (r == 0 || (errno != EAGAIN && errno != EINTR)) close_fd(fdp);
            }
        }
        reap_children();
        for (task_t *t = tasks, *next; t; t = next) {
            next = t->next;
            if (t->conn->dead) continue;  /* parked: its output and EXIT wait for ATTACH */
            if (t->kind == K_PROC) maybe_finish_proc(t);
            else if (t->kind == K_READ && buf_size(&t->conn->out) < OUT_HIGH) pump_read(t);
        }
        for (conn_t *c = conns, *next; c; c = next) {
            next = c->next;
            if (buf_size(&c->out) && buf_flush(&c->out, c->out_fd) < 0) drop_conn(c);
        }
        if (device_path && !conns && device_retry_at_ms >= 0 && now_ms() >= device_retry_at_ms) open_device();
    }
}
