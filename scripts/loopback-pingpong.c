/* Round trips of a 100-byte message over loopback TCP between two processes, blocking sockets, TCP_NODELAY: the
 * floor under any request/response protocol on the host (the cache pool's session lane, gRPC). Prints the mean
 * round trip in microseconds, two rounds.
 *
 *   scripts/bench-loopback.sh rtt [ROUND_TRIPS]
 */
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MESSAGE 100

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int exact(int s, char *buf, int n, int is_send)
{
    for (int done = 0; done < n;) {
        int got = is_send ? (int)send(s, buf + done, n - done, 0) : (int)recv(s, buf + done, n - done, 0);
        if (got <= 0)
            return -1;
        done += got;
    }
    return 0;
}

int main(int argc, char **argv)
{
    long num = argc > 1 ? atol(argv[1]) : 20000;
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof addr;
    if (bind(listener, (void *)&addr, sizeof addr) || listen(listener, 1) || getsockname(listener, (void *)&addr, &len)) {
        perror("listen");
        return 1;
    }
    int one = 1;
    char buf[MESSAGE] = {0};
    if (fork() == 0) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(s, (void *)&addr, sizeof addr))
            _exit(1);
        setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        for (int round = 1; round <= 2; round++) {
            double started = now();
            for (long i = 0; i < num; i++)
                if (exact(s, buf, MESSAGE, 1) || exact(s, buf, MESSAGE, 0))
                    _exit(1);
            printf("round %d C blocking ping-pong %.1f us\n", round, (now() - started) / num * 1e6);
            fflush(stdout);
        }
        _exit(0);
    }
    int s = accept(listener, NULL, NULL);
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    while (exact(s, buf, MESSAGE, 0) == 0 && exact(s, buf, MESSAGE, 1) == 0)
        ;
    wait(NULL);
    return 0;
}
