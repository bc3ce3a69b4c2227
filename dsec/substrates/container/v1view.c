/* dsec-v1view: run a program in a private mount namespace without the hybrid host's cgroup2 mount.
 *
 * crun refuses hybrid cgroup hosts (v1 controllers plus a cgroup2 mount at /sys/fs/cgroup/unified). Run through
 * this helper it sees plain cgroup v1. The namespace dies with the program; the host's mounts are untouched
 * because the new namespace is made private before anything is unmounted in it.
 *
 * usage: dsec-v1view CGROUP2_MOUNT PROGRAM [ARG...]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <sys/mount.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: dsec-v1view CGROUP2_MOUNT PROGRAM [ARG...]\n");
        return 125;
    }
    if (unshare(CLONE_NEWNS) != 0) {
        perror("dsec-v1view: unshare(CLONE_NEWNS)");
        return 125;
    }
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) {
        perror("dsec-v1view: making / private");
        return 125;
    }
    if (umount2(argv[1], MNT_DETACH) != 0 && errno != EINVAL && errno != ENOENT) {
        perror("dsec-v1view: umount2");
        return 125;
    }
    execvp(argv[2], argv + 2);
    perror("dsec-v1view: exec");
    return 127;
}
