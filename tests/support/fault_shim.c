/* An LD_PRELOAD shim that makes fdatasync/fsync fail with EIO on the WAL's segment files while
 * the file named by FLEETLM_FAULT_CONTROL exists. Built by the storage fault tests with `cc`.
 * Only files under a `/wal/lane-` directory are affected, so the SQLite archive keeps working.
 * Also: while the file named by FLEETLM_FAULT_UNREADABLE exists and holds `<path> <from> <to>`,
 * every pread of that file touching bytes [from, to) fails with EIO (a bad sector). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
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

/* Whether a read of [offset, offset + count) of fd touches the configured unreadable range. */
static int unreadable(int fd, off_t offset, size_t count) {
    const char *control = getenv("FLEETLM_FAULT_UNREADABLE");
    if (control == NULL) {
        return 0;
    }
    FILE *file = fopen(control, "r");
    if (file == NULL) {
        return 0;
    }
    char path[4096];
    long long from = 0;
    long long to = 0;
    int parsed = fscanf(file, "%4095s %lld %lld", path, &from, &to);
    fclose(file);
    if (parsed != 3 || (long long)offset >= to || (long long)offset + (long long)count <= from) {
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
    return strcmp(target, path) == 0;
}

ssize_t pread64(int fd, void *buffer, size_t count, off_t offset) {
    static ssize_t (*real_pread64)(int, void *, size_t, off_t) = NULL;
    if (real_pread64 == NULL) {
        real_pread64 = (ssize_t (*)(int, void *, size_t, off_t))dlsym(RTLD_NEXT, "pread64");
    }
    if (unreadable(fd, offset, count)) {
        errno = EIO;
        return -1;
    }
    return real_pread64(fd, buffer, count, offset);
}

ssize_t pread(int fd, void *buffer, size_t count, off_t offset) {
    return pread64(fd, buffer, count, offset);
}
