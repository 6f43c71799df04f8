/*
 * maildir-floor.c - what the Maildir steps alone cost on this disk, with no SMTP and no
 * inboxd: batches of N files of 4219 octets (a 4 KiB benchmark message with inboxd's trace
 * fields), each batch made durable the way inboxd's agent does it, or a variant.
 *
 * The first barrier is chosen as inboxd's agent chooses it on a quiet host
 * (src/delivery/syncer.rs): one fsync for a batch of one file; for more, one syncfs, then
 * sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER) per file for its own writeback error.
 *
 *   mode 0 (named):   open tmp/NAME O_CREAT|O_EXCL, write; first barrier; rename
 *                     tmp/NAME -> new/NAME; fsync new/   (inboxd up to commit c91343a, and
 *                     still where tmp/'s filesystem has no O_TMPFILE)
 *   mode 1 (unnamed): open tmp/ O_TMPFILE, write; first barrier; linkat /proc/self/fd/N ->
 *                     new/NAME; syncfs (it writes every dirty inode, the files' new link
 *                     counts among them; an fsync of new/ is not documented to)   (inboxd
 *                     since commit 232ebb9, on a quiet host)
 *
 * Prints the batch latency (p50, p90), files per second and the CPU (user + system, from
 * getrusage) of this process per file; work the kernel does in its own threads (the flusher
 * that syncfs hands the writeback to) is not counted. Build: cc -O2 -o maildir-floor maildir-floor.c
 * Usage: maildir-floor MODE BATCHES BATCH_SIZE DIR   (DIR gets tmp/ and new/; files are kept)
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static double cpu_us(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return (u.ru_utime.tv_sec + u.ru_stime.tv_sec) * 1e6 + u.ru_utime.tv_usec + u.ru_stime.tv_usec;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s MODE BATCHES BATCH_SIZE DIR\n", argv[0]);
        return 2;
    }
    int mode = atoi(argv[1]), batches = atoi(argv[2]), size = atoi(argv[3]);
    const char *dir = argv[4];
    if (batches < 1 || batches > 1000000 || size < 1 || size > 256 || mode < 0 || mode > 1) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    static char data[4219];
    memset(data, 'x', sizeof data);
    char path[4096], name[64];
    snprintf(path, sizeof path, "%s/tmp", dir);
    mkdir(path, 0700);
    int tmp = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    snprintf(path, sizeof path, "%s/new", dir);
    mkdir(path, 0700);
    int new = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (tmp < 0 || new < 0)
        die("open tmp/ or new/");
    double *lat = malloc(batches * sizeof *lat);
    if (!lat)
        die("malloc");
    int fds[256];
    double c0 = cpu_us(), w0 = now_us();
    for (int b = 0; b < batches; b++) {
        double t0 = now_us();
        for (int i = 0; i < size; i++) {
            snprintf(name, sizeof name, "%d.%d.%d", getpid(), b, i);
            fds[i] = mode == 1 ? openat(tmp, ".", O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600)
                               : openat(tmp, name, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600);
            if (fds[i] < 0)
                die("open");
            if (write(fds[i], data, sizeof data) != (ssize_t)sizeof data)
                die("write");
        }
        if (size == 1) {
            if (fsync(fds[0]))
                die("fsync");
        } else {
            if (syncfs(new))
                die("syncfs");
            for (int i = 0; i < size; i++)
                if (sync_file_range(fds[i], 0, 0,
                                    SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                                        SYNC_FILE_RANGE_WAIT_AFTER))
                    die("sync_file_range");
        }
        for (int i = 0; i < size; i++) {
            snprintf(name, sizeof name, "%d.%d.%d", getpid(), b, i);
            if (mode == 1) {
                char link[64];
                snprintf(link, sizeof link, "/proc/self/fd/%d", fds[i]);
                if (linkat(AT_FDCWD, link, new, name, AT_SYMLINK_FOLLOW))
                    die("linkat");
            } else if (renameat(tmp, name, new, name)) {
                die("rename");
            }
        }
        if (mode == 1 ? syncfs(new) : fsync(new))
            die("sync of new/");
        for (int i = 0; i < size; i++)
            close(fds[i]);
        lat[b] = now_us() - t0;
    }
    double c1 = cpu_us(), w1 = now_us();
    qsort(lat, batches, sizeof *lat, cmp);
    printf("maildir-floor mode=%d batch=%d batches=%d batch_p50_us=%.0f batch_p90_us=%.0f "
           "files_per_s=%.0f cpu_us_per_file=%.1f\n",
           mode, size, batches, lat[batches / 2], lat[batches * 9 / 10],
           batches * size / ((w1 - w0) / 1e6), (c1 - c0) / ((double)batches * size));
    return 0;
}
