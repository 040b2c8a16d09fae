/* Loopback TCP from one process to another, 1 MiB at a time, sent three ways: send() from user memory,
 * vmsplice()+splice() of the same memory (no copy on the sender), sendfile() from a memfd (page-cache pages, no
 * copy on the sender). The receiver recv()s into a 8 MiB ring. Prints GB/s per way. Whether sending without
 * a copy lifts the loopback ceiling that bounds the transfer engine's tcp READ (issue 3).
 *
 *   scripts/bench-loopback.sh zerocopy [MIB_PER_WAY]
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BLOCK (1 << 20)
#define RING (8 * BLOCK)

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static double run(int way, long num_blocks)
{
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof addr;
    if (bind(listener, (void *)&addr, sizeof addr) || listen(listener, 1) || getsockname(listener, (void *)&addr, &len))
        die("listen");
    int pipefd[2];
    if (pipe(pipefd))
        die("pipe");
    pid_t child = fork();
    if (child == 0) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(s, (void *)&addr, sizeof addr))
            die("connect");
        char *ring = aligned_alloc(4096, RING);
        memset(ring, 0, RING);
        long total = 0, want = num_blocks * (long)BLOCK;
        double started = now();
        while (total < want) {
            long at = total % RING;
            ssize_t got = recv(s, ring + at, RING - at, 0);
            if (got <= 0)
                die("recv");
            total += got;
        }
        double gbps = total / (now() - started) / 1e9;
        if (write(pipefd[1], &gbps, sizeof gbps) != sizeof gbps)
            die("report");
        _exit(0);
    }
    int s = accept(listener, NULL, NULL);
    int one = 1;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int fd = memfd_create("loopback-zerocopy", 0);
    if (fd < 0 || ftruncate(fd, RING))
        die("memfd");
    char *src = mmap(NULL, RING, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    memset(src, 1, RING);
    int spl[2];
    if (pipe(spl) || fcntl(spl[1], F_SETPIPE_SZ, BLOCK) < 0)
        die("splice pipe");
    for (long i = 0; i < num_blocks; i++) {
        long base = (i % (RING / BLOCK)) * (long)BLOCK;
        size_t done = 0;
        while (done < BLOCK) {
            ssize_t n;
            if (way == 0) {
                n = send(s, src + base + done, BLOCK - done, 0);
            } else if (way == 1) {
                struct iovec v = {src + base + done, BLOCK - done};
                n = vmsplice(spl[1], &v, 1, 0);
                for (ssize_t left = n; left > 0;) {
                    ssize_t m = splice(spl[0], NULL, s, NULL, left, SPLICE_F_MORE | SPLICE_F_MOVE);
                    if (m <= 0)
                        die("splice");
                    left -= m;
                }
            } else {
                off_t off = base + done;
                n = sendfile(s, fd, &off, BLOCK - done);
            }
            if (n <= 0)
                die("send");
            done += n;
        }
    }
    double gbps = 0;
    if (read(pipefd[0], &gbps, sizeof gbps) != sizeof gbps)
        die("result");
    waitpid(child, NULL, 0);
    close(s);
    close(listener);
    close(fd);
    munmap(src, RING);
    return gbps;
}

int main(int argc, char **argv)
{
    long num_blocks = argc > 1 ? atol(argv[1]) : 4000;
    const char *names[] = {"send", "vmsplice", "sendfile"};
    for (int round = 0; round < 2; round++)
        for (int way = 0; way < 3; way++)
            printf("round %d %-8s %.2f GB/s\n", round + 1, names[way], run(way, num_blocks));
    return 0;
}
