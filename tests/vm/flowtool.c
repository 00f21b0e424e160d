/*
 * flowtool: deterministic TCP/UDP workloads for the VM flow scenarios.
 *
 * Every mode but tcp-fork-serve runs in the calling process (no fork), so
 * the process that owns the sockets is the process the test spawned. Built
 * statically on the host and copied into the guest.
 *
 *   flowtool [-u UID:GID] MODE ARGS...
 *
 *   tcp-serve   ADDR PORT N          accept N connections one after the other;
 *                                    read each up to a newline, answer "ok\n",
 *                                    read until the client closes, close
 *   tcp-recv    ADDR PORT N          like tcp-serve but never writes (receive-only)
 *   tcp-fork-serve ADDR PORT N       accept N connections; fork a child per
 *                                    connection, print "child PID", close the
 *                                    accepted socket in the parent and accept
 *                                    the next; the child closes the listener,
 *                                    serves as tcp-serve and exits; the parent
 *                                    reaps every child and fails if one did
 *   tcp-source  ADDR PORT SECONDS    accept one connection, write a 4 KiB block
 *                                    every 100 ms for SECONDS, close
 *   tcp-client  ADDR PORT N SIZE     N connections one after the other: send SIZE
 *                                    bytes (the last a newline), read the "ok\n"
 *                                    answer, close first (the client keeps
 *                                    TIME_WAIT, so no 4-tuple repeats); SIZE 0:
 *                                    shut down writing and read until EOF
 *   tcp-client-wait ADDR PORT 1 SIZE  one connection: connect, then wait for
 *                                    SIGUSR1 before sending SIZE bytes and
 *                                    reading the answer as tcp-client
 *   udp-echo    ADDR PORT N          one unconnected socket: receive N datagrams,
 *                                    send each back to its sender
 *   udp-recv    ADDR PORT N          one unconnected socket: receive N datagrams
 *   udp-recv-late ADDR PORT N SECONDS  the same, sleeping SECONDS after "ready"
 *                                    before the first recvfrom (datagrams queue)
 *   udp-client  ADDR PORT N SIZE connect|sendto reply|noreply
 *                                    one socket, N datagrams of SIZE bytes, connected
 *                                    (connect+send) or not (sendto); wait for each
 *                                    echo when "reply"
 *
 * Servers print "ready PORT" after listen/bind; clients print "local IP PORT"
 * for every socket once it has a local port. Output is line-buffered.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <grp.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096
#define SOURCE_TICK_NS 100000000L
#define UDP_REPLY_TIMEOUT_S 5

static void die(const char *what) {
    fprintf(stderr, "flowtool: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void usage(void) {
    fprintf(stderr, "usage: flowtool [-u UID:GID] MODE ARGS (see flowtool.c)\n");
    exit(64);
}

static socklen_t parse_addr(const char *ip, int port, struct sockaddr_storage *ss) {
    memset(ss, 0, sizeof *ss);
    struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, ip, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons(port);
        return sizeof *a4;
    }
    if (inet_pton(AF_INET6, ip, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons(port);
        return sizeof *a6;
    }
    fprintf(stderr, "flowtool: bad address %s\n", ip);
    exit(64);
}

static void print_local(int fd) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    char buf[INET6_ADDRSTRLEN];
    int port;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0)
        die("getsockname");
    if (ss.ss_family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        inet_ntop(AF_INET, &a->sin_addr, buf, sizeof buf);
        port = ntohs(a->sin_port);
    } else {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        inet_ntop(AF_INET6, &a->sin6_addr, buf, sizeof buf);
        port = ntohs(a->sin6_port);
    }
    printf("local %s %d\n", buf, port);
}

static int bound(int type, const char *ip, int port) {
    struct sockaddr_storage ss;
    socklen_t len = parse_addr(ip, port, &ss);
    int fd = socket(ss.ss_family, type, 0);
    int one = 1;
    if (fd < 0)
        die("socket");
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&ss, len) < 0)
        die("bind");
    if (type == SOCK_STREAM && listen(fd, 1024) < 0)
        die("listen");
    printf("ready %d\n", port);
    return fd;
}

static void drain(int fd) {
    char buf[BLOCK];
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) != 0)
        if (n < 0 && errno != EINTR)
            die("read");
}

static void write_all(int fd, const char *p, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("write");
        }
        p += n;
        len -= (size_t)n;
    }
}

/* Reads until a newline (or EOF). */
static void read_line(int fd) {
    char buf[BLOCK];
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) != 0) {
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("read");
        }
        if (memchr(buf, '\n', (size_t)n))
            return;
    }
}

/* Reads exactly len bytes. */
static void read_exact(int fd, size_t len) {
    char buf[BLOCK];
    while (len > 0) {
        ssize_t n = read(fd, buf, len < sizeof buf ? len : sizeof buf);
        if (n == 0) {
            fprintf(stderr, "flowtool: early EOF\n");
            exit(2);
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("read");
        }
        len -= (size_t)n;
    }
}

static void tcp_serve(const char *ip, int port, long n, int reply) {
    int lfd = bound(SOCK_STREAM, ip, port);
    for (long i = 0; i < n; i++) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0)
            die("accept");
        if (reply) {
            read_line(fd);
            write_all(fd, "ok\n", 3);
        }
        drain(fd);
        close(fd);
    }
    close(lfd);
}

static void tcp_fork_serve(const char *ip, int port, long n) {
    int lfd = bound(SOCK_STREAM, ip, port);
    int failed = 0;
    for (long i = 0; i < n; i++) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0)
            die("accept");
        pid_t child = fork();
        if (child < 0)
            die("fork");
        if (child == 0) {
            close(lfd);
            read_line(fd);
            write_all(fd, "ok\n", 3);
            drain(fd);
            close(fd);
            _exit(0);
        }
        printf("child %d\n", (int)child);
        close(fd);
    }
    close(lfd);
    for (long i = 0; i < n; i++) {
        int status;
        if (wait(&status) < 0)
            die("wait");
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            failed = 1;
    }
    if (failed) {
        fprintf(stderr, "flowtool: a child failed\n");
        exit(2);
    }
}

static void tcp_source(const char *ip, int port, long seconds) {
    static char block[BLOCK];
    int lfd = bound(SOCK_STREAM, ip, port);
    int fd = accept(lfd, NULL, NULL);
    struct timespec tick = {0, SOURCE_TICK_NS};
    if (fd < 0)
        die("accept");
    memset(block, 'd', sizeof block);
    for (long i = 0; i < seconds * (1000000000L / SOURCE_TICK_NS); i++) {
        write_all(fd, block, sizeof block);
        nanosleep(&tick, NULL);
    }
    shutdown(fd, SHUT_WR);
    drain(fd);
    close(fd);
    close(lfd);
}

static void tcp_client(const char *ip, int port, long n, long size) {
    struct sockaddr_storage ss;
    socklen_t len = parse_addr(ip, port, &ss);
    char *buf = calloc(1, size > 0 ? (size_t)size : 1);
    if (!buf)
        die("calloc");
    for (long i = 0; i < n; i++) {
        int fd = socket(ss.ss_family, SOCK_STREAM, 0);
        if (fd < 0)
            die("socket");
        if (connect(fd, (struct sockaddr *)&ss, len) < 0)
            die("connect");
        print_local(fd);
        if (size > 0) {
            buf[size - 1] = '\n';
            write_all(fd, buf, (size_t)size);
            read_exact(fd, 3);
        } else {
            shutdown(fd, SHUT_WR);
            drain(fd);
        }
        close(fd);
    }
    free(buf);
}

static void tcp_client_wait(const char *ip, int port, long size) {
    struct sockaddr_storage ss;
    socklen_t len = parse_addr(ip, port, &ss);
    sigset_t go;
    int sig;
    char *buf = calloc(1, size > 0 ? (size_t)size : 1);
    if (!buf || size <= 0)
        die("size");
    sigemptyset(&go);
    sigaddset(&go, SIGUSR1);
    if (sigprocmask(SIG_BLOCK, &go, NULL) < 0)
        die("sigprocmask");
    int fd = socket(ss.ss_family, SOCK_STREAM, 0);
    if (fd < 0)
        die("socket");
    if (connect(fd, (struct sockaddr *)&ss, len) < 0)
        die("connect");
    print_local(fd);
    if (sigwait(&go, &sig) != 0)
        die("sigwait");
    buf[size - 1] = '\n';
    write_all(fd, buf, (size_t)size);
    read_exact(fd, 3);
    close(fd);
    free(buf);
}

static void udp_serve(const char *ip, int port, long n, int echo, unsigned delay) {
    char buf[65536];
    int fd = bound(SOCK_DGRAM, ip, port);
    if (delay)
        sleep(delay);
    for (long i = 0; i < n; i++) {
        struct sockaddr_storage peer;
        socklen_t plen = sizeof peer;
        ssize_t got = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&peer, &plen);
        if (got < 0)
            die("recvfrom");
        if (echo && sendto(fd, buf, (size_t)got, 0, (struct sockaddr *)&peer, plen) < 0)
            die("sendto");
    }
    close(fd);
}

static void udp_client(const char *ip, int port, long n, long size, int connected, int reply) {
    struct sockaddr_storage ss;
    socklen_t len = parse_addr(ip, port, &ss);
    char buf[65536];
    struct timeval tv = {UDP_REPLY_TIMEOUT_S, 0};
    int fd = socket(ss.ss_family, SOCK_DGRAM, 0);
    if (fd < 0)
        die("socket");
    if (size < 0 || size > (long)sizeof buf)
        usage();
    memset(buf, 'u', sizeof buf);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connected && connect(fd, (struct sockaddr *)&ss, len) < 0)
        die("connect");
    for (long i = 0; i < n; i++) {
        ssize_t r = connected ? send(fd, buf, (size_t)size, 0)
                              : sendto(fd, buf, (size_t)size, 0, (struct sockaddr *)&ss, len);
        if (r < 0)
            die("send");
        if (i == 0)
            print_local(fd);
        if (reply && recv(fd, buf, sizeof buf, 0) < 0)
            die("recv (echo)");
    }
    close(fd);
}

int main(int argc, char **argv) {
    int a = 1;
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (a + 1 < argc && strcmp(argv[a], "-u") == 0) {
        unsigned uid, gid;
        if (sscanf(argv[a + 1], "%u:%u", &uid, &gid) != 2)
            usage();
        if (setgroups(0, NULL) < 0 || setgid(gid) < 0 || setuid(uid) < 0)
            die("setuid");
        a += 2;
    }
    if (argc - a < 4)
        usage();
    const char *mode = argv[a], *ip = argv[a + 1];
    int port = atoi(argv[a + 2]);
    long n = atol(argv[a + 3]);
    if (strcmp(mode, "tcp-serve") == 0)
        tcp_serve(ip, port, n, 1);
    else if (strcmp(mode, "tcp-recv") == 0)
        tcp_serve(ip, port, n, 0);
    else if (strcmp(mode, "tcp-fork-serve") == 0)
        tcp_fork_serve(ip, port, n);
    else if (strcmp(mode, "tcp-source") == 0)
        tcp_source(ip, port, n);
    else if (strcmp(mode, "tcp-client") == 0 && argc - a == 5)
        tcp_client(ip, port, n, atol(argv[a + 4]));
    else if (strcmp(mode, "tcp-client-wait") == 0 && argc - a == 5)
        tcp_client_wait(ip, port, atol(argv[a + 4]));
    else if (strcmp(mode, "udp-echo") == 0)
        udp_serve(ip, port, n, 1, 0);
    else if (strcmp(mode, "udp-recv") == 0)
        udp_serve(ip, port, n, 0, 0);
    else if (strcmp(mode, "udp-recv-late") == 0 && argc - a == 5)
        udp_serve(ip, port, n, 0, (unsigned)atoi(argv[a + 4]));
    else if (strcmp(mode, "udp-client") == 0 && argc - a == 7)
        udp_client(ip, port, n, atol(argv[a + 4]), strcmp(argv[a + 5], "connect") == 0,
                   strcmp(argv[a + 6], "reply") == 0);
    else
        usage();
    return 0;
}
