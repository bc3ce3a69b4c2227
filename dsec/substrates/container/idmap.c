/* dsec-idmap: idmapped mounts for sandboxes that run in a user namespace.
 *
 * A sandbox's root is host uid BASE (its ids 0..65535 are host BASE..BASE+65535), but the shared image layers
 * are owned by host ids 0..65535. An idmapped mount shows the same files shifted by BASE without copying or
 * chowning them, so one layer store serves every sandbox. The kernel takes the shift from a user namespace; this
 * helper makes one (a child that unshares and is gone when the helper exits), applies it with
 * mount_setattr(MOUNT_ATTR_IDMAP) to detached clones of the source trees and mounts the result.
 *
 * usage:
 *   dsec-idmap overlay INSIDE OUTSIDE COUNT TARGET OPTIONS LOWER...
 *       overlay on TARGET: each LOWER idmapped (ids INSIDE.. shown as OUTSIDE..), passed to overlayfs as a
 *       file descriptor, so no idmapped lower is ever attached anywhere; OPTIONS holds upperdir=,workdir=...
 *   dsec-idmap bind INSIDE OUTSIDE COUNT SOURCE TARGET [ro]
 *       an idmapped bind mount of SOURCE on TARGET (a volume, or a view of an upper dir with ids shifted back).
 * Exit 0 on success; else a message on stderr (its errno name first) and exit 1 (2 for bad usage).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sys/mount.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static int fail(const char *what, const char *arg) {
    int err = errno;
    fprintf(stderr, "%s: dsec-idmap: %s %s: %s\n", strerrorname_np(err) ? strerrorname_np(err) : "E?", what, arg,
            strerror(err));
    return 1;
}

static int write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = write(fd, text, strlen(text));
    int err = errno;
    close(fd);
    errno = err;
    return n == (ssize_t)strlen(text) ? 0 : -1;
}

/* A user namespace whose ids INSIDE..INSIDE+COUNT-1 are host ids OUTSIDE..: an fd on it, or -1. */
static int make_userns(const char *inside, const char *outside, const char *count) {
    int ready[2], hold[2];
    if (pipe2(ready, O_CLOEXEC) != 0 || pipe2(hold, O_CLOEXEC) != 0) return -1;
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        char byte = 0;
        close(ready[0]);
        close(hold[1]);
        if (unshare(CLONE_NEWUSER) != 0) _exit(1);
        if (write(ready[1], &byte, 1) != 1) _exit(1);
        while (read(hold[0], &byte, 1) > 0) {}
        _exit(0);
    }
    close(ready[1]);
    close(hold[0]);
    char byte, path[64], map[128];
    int fd = -1, err = 0;
    if (read(ready[0], &byte, 1) != 1) {
        err = ECHILD;
        goto out;
    }
    snprintf(map, sizeof map, "%s %s %s\n", inside, outside, count);
    snprintf(path, sizeof path, "/proc/%d/uid_map", (int)pid);
    if (write_file(path, map) != 0) { err = errno; goto out; }
    snprintf(path, sizeof path, "/proc/%d/gid_map", (int)pid);
    if (write_file(path, map) != 0) { err = errno; goto out; }
    snprintf(path, sizeof path, "/proc/%d/ns/user", (int)pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) err = errno;
out:
    close(ready[0]);
    close(hold[1]);
    waitpid(pid, NULL, 0);
    errno = err;
    return fd;
}

/* A detached clone of the tree at `path`, idmapped through `userns`: an fd on it, or -1. */
static int idmapped_tree(const char *path, int userns, int readonly) {
    int fd = (int)syscall(SYS_open_tree, AT_FDCWD, path, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
    if (fd < 0) return -1;
    struct mount_attr attr = {.attr_set = MOUNT_ATTR_IDMAP | (readonly ? MOUNT_ATTR_RDONLY : 0),
                              .userns_fd = (unsigned long long)userns};
    if (syscall(SYS_mount_setattr, fd, "", AT_EMPTY_PATH, &attr, sizeof attr) != 0) {
        int err = errno;
        close(fd);
        errno = err;
        return -1;
    }
    return fd;
}

static int overlay(char **argv, int argc) {
    /* argv: INSIDE OUTSIDE COUNT TARGET OPTIONS LOWER... */
    int userns = make_userns(argv[0], argv[1], argv[2]);
    if (userns < 0) return fail("making a user namespace for", argv[3]);
    size_t size = strlen(argv[4]) + 32 + (size_t)(argc - 5) * 24;
    char *options = malloc(size);
    if (options == NULL) return fail("allocating options for", argv[3]);
    size_t used = (size_t)snprintf(options, size, "lowerdir=");
    for (int i = 5; i < argc; i++) {
        int fd = idmapped_tree(argv[i], userns, 1);
        if (fd < 0) return fail("idmapping layer", argv[i]);
        used += (size_t)snprintf(options + used, size - used, "%s/proc/self/fd/%d", i > 5 ? ":" : "", fd);
    }
    snprintf(options + used, size - used, ",%s", argv[4]);
    if (mount("overlay", argv[3], "overlay", 0, options) != 0) return fail("mounting overlay on", argv[3]);
    return 0;
}

static int bind(char **argv, int argc) {
    /* argv: INSIDE OUTSIDE COUNT SOURCE TARGET [ro] */
    int userns = make_userns(argv[0], argv[1], argv[2]);
    if (userns < 0) return fail("making a user namespace for", argv[4]);
    int fd = idmapped_tree(argv[3], userns, argc > 5 && strcmp(argv[5], "ro") == 0);
    if (fd < 0) return fail("idmapping", argv[3]);
    if (syscall(SYS_move_mount, fd, "", AT_FDCWD, argv[4], MOVE_MOUNT_F_EMPTY_PATH) != 0)
        return fail("attaching an idmapped mount on", argv[4]);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 8 && strcmp(argv[1], "overlay") == 0) return overlay(argv + 2, argc - 2);
    if ((argc == 7 || argc == 8) && strcmp(argv[1], "bind") == 0) return bind(argv + 2, argc - 2);
    fprintf(stderr,
            "usage: dsec-idmap overlay INSIDE OUTSIDE COUNT TARGET OPTIONS LOWER...\n"
            "       dsec-idmap bind INSIDE OUTSIDE COUNT SOURCE TARGET [ro]\n");
    return 2;
}
