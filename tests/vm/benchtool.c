/*
 * benchtool: the workloads of the overhead benchmark (bench_overhead.py).
 *
 * Each mode forks its own server on 127.0.0.1 (an ephemeral port), waits
 * until it is ready, then runs the client and times it with
 * CLOCK_MONOTONIC. Built statically on the host and copied into the guest.
 *
 *   benchtool churn N       N short TCP connections one after the other: the
 *                           client sends a 28-byte HTTP/1.0 request, the server
 *                           answers 1216 bytes and closes, the client reads to
 *                           EOF and closes
 *   benchtool bulk MIB      one TCP connection: the client writes MIB MiB in
 *                           64 KiB writes and shuts down writing; the server
 *                           reads to EOF and answers the byte count
 *   benchtool udp N SIZE    one unconnected UDP socket sends N datagrams of
 *                           SIZE bytes with sendto to a receiver whose buffer
 *                           holds them all (none is dropped on loopback); the
 *                           receiver counts them
 *
 * Output, one line: "wall_ns W cpu_ns C units U" where W is the client's
 * elapsed time until the server finished, C the user+system CPU of client
 * and server together, and U the connections, bytes or datagrams that got
 * through. Every mode gives up after ALARM_S seconds.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define ALARM_S 300
#define BULK_CHUNK 65536
#define RESPONSE_SIZE 1216
#define UDP_RCVBUF (64 << 20)
#define UDP_IDLE_TIMEOUT_S 10

static const char REQUEST[] = "GET /index.html HTTP/1.0\r\n\r\n";

static void die(const char *what) {
    fprintf(stderr, "benchtool: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void usage(void) {
    fprintf(stderr, "usage: benchtool churn N | bulk MIB | udp N SIZE\n");
    exit(64);
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t tv_ns(struct timeval tv) {
    return (int64_t)tv.tv_sec * 1000000000 + (int64_t)tv.tv_usec * 1000;
}

/* CPU of this process plus its waited-for children. */
static int64_t cpu_ns(void) {
    struct rusage self, kids;
    getrusage(RUSAGE_SELF, &self);
    getrusage(RUSAGE_CHILDREN, &kids);
    return tv_ns(self.ru_utime) + tv_ns(self.ru_stime) + tv_ns(kids.ru_utime) + tv_ns(kids.ru_stime);
}

static void write_all(int fd, const void *p, size_t len) {
    const char *c = p;
    while (len > 0) {
        ssize_t n = write(fd, c, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("write");
        }
        c += n;
        len -= (size_t)n;
    }
}

/* Reads to EOF; returns the bytes read. */
static int64_t drain(int fd) {
    static char buf[BULK_CHUNK];
    int64_t total = 0;
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n == 0)
            return total;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("read");
        }
        total += n;
    }
}

static int listener(int type, struct sockaddr_in *addr) {
    socklen_t len = sizeof *addr;
    int fd = socket(AF_INET, type, 0);
    if (fd < 0)
        die("socket");
    memset(addr, 0, sizeof *addr);
    addr->sin_family = AF_INET;
    addr->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (type == SOCK_DGRAM) {
        int size = UDP_RCVBUF;
        if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0)
            die("SO_RCVBUFFORCE");
    }
    if (bind(fd, (struct sockaddr *)addr, len) < 0)
        die("bind");
    if (type == SOCK_STREAM && listen(fd, 1024) < 0)
        die("listen");
    if (getsockname(fd, (struct sockaddr *)addr, &len) < 0)
        die("getsockname");
    return fd;
}

/* Forks the server; the child runs serve(fd, result pipe) and exits. The
 * parent returns once the child is running. */
static pid_t fork_server(int fd, int result[2], void (*serve)(int, int, long), long arg) {
    if (pipe(result) < 0)
        die("pipe");
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        alarm(ALARM_S); /* a child does not inherit the parent's alarm */
        close(result[0]);
        serve(fd, result[1], arg);
        _exit(0);
    }
    close(result[1]);
    close(fd);
    return pid;
}

static int64_t finish_server(pid_t pid, int result) {
    int64_t units = -1;
    int status;
    if (read(result, &units, sizeof units) != sizeof units)
        units = -1;
    if (waitpid(pid, &status, 0) < 0)
        die("waitpid");
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "benchtool: server failed (status %d)\n", status);
        exit(2);
    }
    return units;
}

static void churn_serve(int lfd, int out, long n) {
    static char response[RESPONSE_SIZE];
    char buf[512];
    int64_t done = 0;
    memset(response, 'r', sizeof response);
    memcpy(response, "HTTP/1.0 200 OK\r\n\r\n", 19);
    for (long i = 0; i < n; i++) {
        int fd = accept(lfd, NULL, NULL);
        size_t got = 0;
        if (fd < 0)
            die("accept");
        while (got < sizeof REQUEST - 1) {
            ssize_t r = read(fd, buf, sizeof buf);
            if (r <= 0)
                break;
            got += (size_t)r;
        }
        write_all(fd, response, sizeof response);
        close(fd);
        done++;
    }
    write_all(out, &done, sizeof done);
}

static void churn(long n) {
    struct sockaddr_in addr;
    int result[2];
    int lfd = listener(SOCK_STREAM, &addr);
    pid_t pid = fork_server(lfd, result, churn_serve, n);
    int64_t t0 = now_ns(), answered = 0;
    for (long i = 0; i < n; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0)
            die("socket");
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
            die("connect");
        write_all(fd, REQUEST, sizeof REQUEST - 1);
        if (drain(fd) == RESPONSE_SIZE)
            answered++;
        close(fd);
    }
    int64_t served = finish_server(pid, result[0]);
    int64_t wall = now_ns() - t0;
    printf("wall_ns %lld cpu_ns %lld units %lld\n", (long long)wall, (long long)cpu_ns(),
           (long long)(served < answered ? served : answered));
}

static void bulk_serve(int lfd, int out, long unused) {
    (void)unused;
    int fd = accept(lfd, NULL, NULL);
    if (fd < 0)
        die("accept");
    int64_t total = drain(fd);
    write_all(fd, &total, sizeof total);
    close(fd);
    write_all(out, &total, sizeof total);
}

static void bulk(long mib) {
    static char chunk[BULK_CHUNK];
    struct sockaddr_in addr;
    int result[2];
    int lfd = listener(SOCK_STREAM, &addr);
    pid_t pid = fork_server(lfd, result, bulk_serve, 0);
    int64_t echoed = -1;
    memset(chunk, 'b', sizeof chunk);
    int64_t t0 = now_ns();
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        die("socket");
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        die("connect");
    for (long i = 0; i < mib * ((1 << 20) / BULK_CHUNK); i++)
        write_all(fd, chunk, sizeof chunk);
    shutdown(fd, SHUT_WR);
    if (read(fd, &echoed, sizeof echoed) != sizeof echoed)
        die("read count");
    close(fd);
    int64_t received = finish_server(pid, result[0]);
    int64_t wall = now_ns() - t0;
    if (echoed != received)
        received = -1;
    printf("wall_ns %lld cpu_ns %lld units %lld\n", (long long)wall, (long long)cpu_ns(), (long long)received);
}

static void udp_serve(int fd, int out, long n) {
    static char buf[65536];
    struct timeval idle = {UDP_IDLE_TIMEOUT_S, 0};
    int64_t got = 0;
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &idle, sizeof idle);
    while (got < n) {
        ssize_t r = recv(fd, buf, sizeof buf, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            break; /* idle timeout: datagrams were lost */
        }
        got++;
    }
    write_all(out, &got, sizeof got);
}

static void udp(long n, long size) {
    static char buf[65536];
    struct sockaddr_in addr;
    int result[2];
    if (size < 1 || size > (long)sizeof buf)
        usage();
    int lfd = listener(SOCK_DGRAM, &addr);
    pid_t pid = fork_server(lfd, result, udp_serve, n);
    memset(buf, 'u', sizeof buf);
    int64_t t0 = now_ns();
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0)
        die("socket");
    for (long i = 0; i < n; i++) {
        if (sendto(fd, buf, (size_t)size, 0, (struct sockaddr *)&addr, sizeof addr) < 0) {
            if (errno == EINTR || errno == ENOBUFS) {
                i--;
                continue;
            }
            die("sendto");
        }
    }
    close(fd);
    int64_t received = finish_server(pid, result[0]);
    int64_t wall = now_ns() - t0;
    printf("wall_ns %lld cpu_ns %lld units %lld\n", (long long)wall, (long long)cpu_ns(), (long long)received);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGPIPE, SIG_IGN);
    alarm(ALARM_S);
    if (argc == 3 && strcmp(argv[1], "churn") == 0)
        churn(atol(argv[2]));
    else if (argc == 3 && strcmp(argv[1], "bulk") == 0)
        bulk(atol(argv[2]));
    else if (argc == 4 && strcmp(argv[1], "udp") == 0)
        udp(atol(argv[2]), atol(argv[3]));
    else
        usage();
    return 0;
}
