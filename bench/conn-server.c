/*
 * The far end of bench/packet-cost.ts: answers every connection with one
 * HTTP response and closes it, in WORKERS processes sharing one listening
 * socket. It is C because a server in Node spends more CPU per
 * connection than the table under test does, which hides the table's cost;
 * and not a Debian web server, because installing one starts it as a service
 * on this machine's own network.
 *
 *   conn-server ADDRESS PORT WORKERS      prints "ready" once listening
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

static const char response[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";

static int listen_on(const char *address, int port) {
  struct sockaddr_in6 sa = {.sin6_family = AF_INET6, .sin6_port = htons(port)};
  if (inet_pton(AF_INET6, address, &sa.sin6_addr) != 1) {
    fprintf(stderr, "conn-server: %s is not an IPv6 address\n", address);
    exit(2);
  }
  int one = 1;
  int fd = socket(AF_INET6, SOCK_STREAM | SOCK_NONBLOCK, 0);
  /* SO_REUSEADDR: the last run's connections linger in TIME_WAIT on this port. */
  if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
      bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(fd, 4096) < 0) {
    perror("conn-server: listen");
    exit(1);
  }
  return fd;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: conn-server ADDRESS PORT WORKERS\n");
    return 2;
  }
  /* Listening before the workers start: once "ready" is printed, every one of them can accept. */
  int listener = listen_on(argv[1], atoi(argv[2]));
  int workers = atoi(argv[3]);
  pid_t parent = getpid();
  for (int i = 1; i < workers; i++) {
    pid_t child = fork();
    if (child < 0) {
      perror("conn-server: fork");
      return 1;
    }
    if (child == 0) {
      /* Workers end with the parent, which is the process the benchmark kills. */
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(0);
      break;
    }
  }
  int ep = epoll_create1(0);
  struct epoll_event ev = {.events = EPOLLIN, .data.fd = listener};
  if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, listener, &ev) < 0) {
    perror("conn-server: epoll");
    return 1;
  }
  if (getpid() == parent) {
    printf("ready\n");
    fflush(stdout);
  }

  struct epoll_event events[256];
  char request[4096];
  for (;;) {
    int n = epoll_wait(ep, events, 256, -1);
    if (n < 0 && errno != EINTR) return 1;
    for (int i = 0; i < n; i++) {
      int fd = events[i].data.fd;
      if (fd == listener) {
        int conn;
        while ((conn = accept4(listener, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
          struct epoll_event cev = {.events = EPOLLIN, .data.fd = conn};
          if (epoll_ctl(ep, EPOLL_CTL_ADD, conn, &cev) < 0) close(conn);
        }
        continue;
      }
      ssize_t got = read(fd, request, sizeof request);
      if (got < 0 && errno == EAGAIN) continue;
      /* The request's content does not matter: one read is one request. */
      if (got > 0 && write(fd, response, sizeof response - 1) < 0) {
        /* The client went away; closing is all there is to do. */
      }
      close(fd);
    }
  }
}
