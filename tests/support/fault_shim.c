/* An LD_PRELOAD shim that makes fdatasync/fsync fail with EIO on the WAL's segment files while
 * the file named by FLEETLM_FAULT_CONTROL exists. Built by the storage fault tests with `cc`.
 * Only files under a `/wal/lane-` directory are affected, so the SQLite archive keeps working. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int should_fail(int fd) {
    const char *control = getenv("FLEETLM_FAULT_CONTROL");
    if (control == NULL || access(control, F_OK) != 0) {
        return 0;
    }
    char link[64];
    char target[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t length = readlink(link, target, sizeof target - 1);
    if (length <= 0) {
        return 0;
    }
    target[length] = '\0';
    return strstr(target, "/wal/lane-") != NULL;
}

int fdatasync(int fd) {
    static int (*real_fdatasync)(int) = NULL;
    if (real_fdatasync == NULL) {
        real_fdatasync = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    }
    if (should_fail(fd)) {
        errno = EIO;
        return -1;
    }
    return real_fdatasync(fd);
}

int fsync(int fd) {
    static int (*real_fsync)(int) = NULL;
    if (real_fsync == NULL) {
        real_fsync = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    }
    if (should_fail(fd)) {
        errno = EIO;
        return -1;
    }
    return real_fsync(fd);
}
