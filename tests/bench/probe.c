/*
 * probe.c - the benchmark's measuring loops, in C so that what is timed is the
 * system call and not the interpreter around it.
 *
 * Built by tests/bench/probe.py with the machine's C compiler into
 * bench-results/ (the guest runs the same binary: it sees the host's files).
 * Every loop is bounded by a count AND a time limit. Each command prints ONE
 * JSON line on stdout.
 *
 *   connect ADDR PORT N MAXSEC           socket+connect+close (RST), N times
 *   stream ADDR PORT SECONDS             send as fast as possible for SECONDS
 *   exec N MAXSEC PATH                   fork + execve(PATH) + waitpid, N times
 *   open N MAXSEC BATCH PATH             open(O_RDONLY)+close, timed per BATCH
 *   udpflood ADDR PORT NPORTS COUNT RATE MAXSEC
 *                                        COUNT datagrams to ports PORT..PORT+NPORTS-1
 *                                        (cycling), paced at RATE/s (0: flat out)
 *   serve-accept ADDR PORT MAXSEC        accept and close, until MAXSEC
 *   serve-sink ADDR PORT MAXSEC          accept and read until EOF, until MAXSEC
 *   poll-verdict ADDR PORT TIMEOUT       per stdin line ("allow"/"deny"): connect
 *                                        every 0.5 ms until the outcome is that
 *                                        verdict; print CLOCK_MONOTONIC ns then
 *   mkfiles DIR N                        create DIR/f0 .. DIR/f{N-1} (empty)
 *   try-connect ADDR PORT TIMEOUT_MS     one non-blocking connect: connected, error
 *                                        (with errno) or timeout
 *
 * Latency results: per-operation samples are sorted and summarised (median,
 * p10, p90, p99, mean) in nanoseconds.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static uint64_t pick(const uint64_t *sorted, size_t n, double q)
{
	size_t i = (size_t)(q * (double)(n - 1) + 0.5);

	return sorted[i < n ? i : n - 1];
}

/* Print the summary of n samples (sorted in place), plus extra JSON fields. */
static void summary(uint64_t *s, size_t n, long errors, int first_errno, const char *extra)
{
	double sum = 0;

	if (n == 0) {
		printf("{\"n\": 0, \"errors\": %ld, \"errno\": %d%s}\n", errors, first_errno, extra);
		return;
	}
	qsort(s, n, sizeof(*s), cmp_u64);
	for (size_t i = 0; i < n; i++)
		sum += (double)s[i];
	printf("{\"n\": %zu, \"errors\": %ld, \"errno\": %d, \"median_ns\": %llu, "
	       "\"p10_ns\": %llu, \"p90_ns\": %llu, \"p99_ns\": %llu, \"mean_ns\": %.1f%s}\n",
	       n, errors, first_errno, (unsigned long long)pick(s, n, 0.5),
	       (unsigned long long)pick(s, n, 0.1), (unsigned long long)pick(s, n, 0.9),
	       (unsigned long long)pick(s, n, 0.99), sum / (double)n, extra);
}

static int parse_addr(const char *text, int port, struct sockaddr_in *sa)
{
	memset(sa, 0, sizeof(*sa));
	sa->sin_family = AF_INET;
	sa->sin_port = htons((uint16_t)port);
	return inet_pton(AF_INET, text, &sa->sin_addr) == 1 ? 0 : -1;
}

static uint64_t *samples(long n)
{
	uint64_t *s = calloc((size_t)(n > 0 ? n : 1), sizeof(uint64_t));

	if (!s) {
		perror("calloc");
		exit(2);
	}
	return s;
}

/* connect(): the timed part is connect() alone; close() resets (no TIME_WAIT). */
static int cmd_connect(const char *addr, int port, long n, double maxsec)
{
	struct sockaddr_in sa;
	struct linger lg = { .l_onoff = 1, .l_linger = 0 };
	uint64_t *s = samples(n), deadline;
	size_t got = 0;
	long errors = 0;
	int first_errno = 0;

	if (parse_addr(addr, port, &sa))
		return 2;
	deadline = now_ns() + (uint64_t)(maxsec * 1e9);
	for (long i = 0; i < n && now_ns() < deadline; i++) {
		int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		uint64_t t0, t1;

		if (fd < 0) {
			perror("socket");
			return 2;
		}
		setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
		t0 = now_ns();
		if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
			t1 = now_ns();
			s[got++] = t1 - t0;
		} else {
			errors++;
			if (!first_errno)
				first_errno = errno;
		}
		close(fd);
	}
	summary(s, got, errors, first_errno, "");
	free(s);
	return 0;
}

static int cmd_stream(const char *addr, int port, double seconds)
{
	static char buf[1 << 16];
	struct sockaddr_in sa;
	uint64_t t0, deadline, sent = 0;
	int fd;

	if (parse_addr(addr, port, &sa))
		return 2;
	fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
		printf("{\"error\": \"connect: %s\", \"errno\": %d}\n", strerror(errno), errno);
		return 0;
	}
	memset(buf, 'x', sizeof(buf));
	t0 = now_ns();
	deadline = t0 + (uint64_t)(seconds * 1e9);
	while (now_ns() < deadline) {
		ssize_t w = send(fd, buf, sizeof(buf), 0);

		if (w < 0) {
			if (errno == EINTR)
				continue;
			printf("{\"error\": \"send: %s\", \"errno\": %d, \"bytes\": %llu}\n",
			       strerror(errno), errno, (unsigned long long)sent);
			close(fd);
			return 0;
		}
		sent += (uint64_t)w;
	}
	{
		uint64_t elapsed = now_ns() - t0;

		close(fd);
		printf("{\"bytes\": %llu, \"elapsed_ns\": %llu, \"gbit_s\": %.4f}\n",
		       (unsigned long long)sent, (unsigned long long)elapsed,
		       (double)sent * 8.0 / (double)elapsed);
	}
	return 0;
}

static int cmd_exec(long n, double maxsec, const char *path)
{
	uint64_t *s = samples(n), deadline = now_ns() + (uint64_t)(maxsec * 1e9);
	size_t got = 0;
	long errors = 0;
	int first_errno = 0;
	char *argv[] = { (char *)path, NULL };
	char *envp[] = { NULL };

	for (long i = 0; i < n && now_ns() < deadline; i++) {
		uint64_t t0 = now_ns();
		pid_t pid = fork();
		int status = 0;

		if (pid < 0) {
			perror("fork");
			return 2;
		}
		if (pid == 0) {
			execve(path, argv, envp);
			_exit(126 + (errno == EPERM || errno == EACCES ? 1 : 0));
		}
		if (waitpid(pid, &status, 0) < 0) {
			perror("waitpid");
			return 2;
		}
		if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
			s[got++] = now_ns() - t0;
		} else {
			errors++;
			if (!first_errno)
				first_errno = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
		}
	}
	summary(s, got, errors, first_errno, "");
	free(s);
	return 0;
}

/* open()+close(); one sample per batch, divided by the batch size: the clock
 * read costs less than the operation only when amortised (notably under TCG). */
static int cmd_open(long n, double maxsec, long batch, const char *path)
{
	long batches = n / (batch > 0 ? batch : 1);
	uint64_t *s = samples(batches), deadline = now_ns() + (uint64_t)(maxsec * 1e9);
	size_t got = 0;
	long errors = 0;
	int first_errno = 0;

	if (batch < 1)
		batch = 1;
	for (long b = 0; b < batches && now_ns() < deadline; b++) {
		uint64_t t0 = now_ns();
		long bad = 0;

		for (long i = 0; i < batch; i++) {
			int fd = open(path, O_RDONLY | O_CLOEXEC);

			if (fd < 0) {
				bad++;
				if (!first_errno)
					first_errno = errno;
				continue;
			}
			close(fd);
		}
		if (bad) {
			errors += bad;
			continue;
		}
		s[got++] = (now_ns() - t0) / (uint64_t)batch;
	}
	{
		char extra[64];

		snprintf(extra, sizeof(extra), ", \"batch\": %ld", batch);
		summary(s, got, errors, first_errno, extra);
	}
	free(s);
	return 0;
}

static int cmd_udpflood(const char *addr, int port, int nports, long count, double rate,
			double maxsec)
{
	static const char payload[] = "guard-bench";
	struct sockaddr_in sa;
	uint64_t t0, deadline;
	long sent = 0, errors = 0;
	int first_errno = 0, fd;

	if (parse_addr(addr, port, &sa) || nports < 1)
		return 2;
	fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		perror("socket");
		return 2;
	}
	t0 = now_ns();
	deadline = t0 + (uint64_t)(maxsec * 1e9);
	for (long i = 0; i < count; i++) {
		uint64_t now = now_ns();

		if (now >= deadline)
			break;
		if (rate > 0) {
			/* pace: datagram i is due at t0 + i / rate */
			uint64_t due = t0 + (uint64_t)((double)i * 1e9 / rate);

			while (now < due) {
				if (due - now > 200000) {
					struct timespec ts = { 0, 100000 };

					nanosleep(&ts, NULL);
				}
				now = now_ns();
			}
		}
		sa.sin_port = htons((uint16_t)(port + (int)(i % nports)));
		if (sendto(fd, payload, sizeof(payload) - 1, 0, (struct sockaddr *)&sa,
			   sizeof(sa)) < 0) {
			errors++;
			if (!first_errno)
				first_errno = errno;
		} else {
			sent++;
		}
	}
	{
		uint64_t elapsed = now_ns() - t0;

		close(fd);
		printf("{\"sent\": %ld, \"errors\": %ld, \"errno\": %d, \"elapsed_ns\": %llu, "
		       "\"rate\": %.1f}\n", sent, errors, first_errno,
		       (unsigned long long)elapsed, (double)sent * 1e9 / (double)elapsed);
	}
	return 0;
}

static int listener(const char *addr, int port)
{
	struct sockaddr_in sa;
	int one = 1, fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (parse_addr(addr, port, &sa)) {
		fprintf(stderr, "bad address %s\n", addr);
		exit(2);
	}
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(fd, 4096) != 0) {
		perror("listen");
		exit(2);
	}
	return fd;
}

/* Servers: accept with a poll timeout so that MAXSEC bounds their life. */
static int cmd_serve(const char *addr, int port, double maxsec, int sink)
{
	static char buf[1 << 18];
	int fd = listener(addr, port);
	uint64_t deadline = now_ns() + (uint64_t)(maxsec * 1e9);

	printf("ready\n");
	fflush(stdout);
	while (now_ns() < deadline) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		int c;

		if (poll(&p, 1, 200) <= 0)
			continue;
		c = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
		if (c < 0)
			continue;
		if (sink) {
			struct timeval tv = { .tv_sec = 5 };

			setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
			while (now_ns() < deadline && read(c, buf, sizeof(buf)) > 0)
				;
		}
		close(c);
	}
	return 0;
}

/* 1: connected, 0: refused by policy (EPERM), -1: something else */
static int try_connect(const struct sockaddr_in *sa)
{
	struct linger lg = { .l_onoff = 1, .l_linger = 0 };
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), rc, err;

	if (fd < 0)
		return -1;
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	rc = connect(fd, (const struct sockaddr *)sa, sizeof(*sa));
	err = errno;
	close(fd);
	if (rc == 0)
		return 1;
	return err == EPERM ? 0 : -1;
}

static int cmd_poll_verdict(const char *addr, int port, double timeout)
{
	struct sockaddr_in sa;
	char line[64];

	if (parse_addr(addr, port, &sa))
		return 2;
	printf("ready\n");
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin)) {
		int want = strncmp(line, "allow", 5) == 0 ? 1 : 0;
		uint64_t deadline = now_ns() + (uint64_t)(timeout * 1e9);
		long attempts = 0;
		int seen = -2;

		while (now_ns() < deadline) {
			struct timespec ts = { 0, 500000 };

			seen = try_connect(&sa);
			attempts++;
			if (seen == want)
				break;
			nanosleep(&ts, NULL);
		}
		printf("{\"seen_ns\": %llu, \"ok\": %s, \"attempts\": %ld, \"last\": %d}\n",
		       (unsigned long long)now_ns(), seen == want ? "true" : "false", attempts, seen);
		fflush(stdout);
	}
	return 0;
}

static int cmd_mkfiles(const char *dir, long n)
{
	char path[4096];

	for (long i = 0; i < n; i++) {
		int fd;

		snprintf(path, sizeof(path), "%s/f%ld", dir, i);
		fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0755);
		if (fd < 0) {
			perror(path);
			return 2;
		}
		close(fd);
	}
	printf("{\"created\": %ld}\n", n);
	return 0;
}

static int cmd_try_connect(const char *addr, int port, int timeout_ms)
{
	struct sockaddr_in sa;
	struct linger lg = { .l_onoff = 1, .l_linger = 0 };
	int fd, rc, err = 0;
	socklen_t len = sizeof(err);
	const char *result;

	if (parse_addr(addr, port, &sa))
		return 2;
	fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		perror("socket");
		return 2;
	}
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	rc = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
	if (rc == 0) {
		result = "connected";
	} else if (errno != EINPROGRESS) {
		err = errno;
		result = "error";
	} else {
		struct pollfd p = { .fd = fd, .events = POLLOUT };

		if (poll(&p, 1, timeout_ms) <= 0) {
			result = "timeout";
		} else {
			getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
			result = err ? "error" : "connected";
		}
	}
	close(fd);
	printf("{\"result\": \"%s\", \"errno\": %d}\n", result, err);
	return 0;
}

static void usage(void)
{
	fprintf(stderr, "usage: see the comment at the top of probe.c\n");
	exit(2);
}

int main(int argc, char **argv)
{
	const char *cmd = argc > 1 ? argv[1] : "";

	signal(SIGPIPE, SIG_IGN);
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!strcmp(cmd, "connect") && argc == 6)
		return cmd_connect(argv[2], atoi(argv[3]), atol(argv[4]), atof(argv[5]));
	if (!strcmp(cmd, "stream") && argc == 5)
		return cmd_stream(argv[2], atoi(argv[3]), atof(argv[4]));
	if (!strcmp(cmd, "exec") && argc == 5)
		return cmd_exec(atol(argv[2]), atof(argv[3]), argv[4]);
	if (!strcmp(cmd, "open") && argc == 6)
		return cmd_open(atol(argv[2]), atof(argv[3]), atol(argv[4]), argv[5]);
	if (!strcmp(cmd, "udpflood") && argc == 8)
		return cmd_udpflood(argv[2], atoi(argv[3]), atoi(argv[4]), atol(argv[5]),
				    atof(argv[6]), atof(argv[7]));
	if (!strcmp(cmd, "serve-accept") && argc == 5)
		return cmd_serve(argv[2], atoi(argv[3]), atof(argv[4]), 0);
	if (!strcmp(cmd, "serve-sink") && argc == 5)
		return cmd_serve(argv[2], atoi(argv[3]), atof(argv[4]), 1);
	if (!strcmp(cmd, "poll-verdict") && argc == 5)
		return cmd_poll_verdict(argv[2], atoi(argv[3]), atof(argv[4]));
	if (!strcmp(cmd, "try-connect") && argc == 5)
		return cmd_try_connect(argv[2], atoi(argv[3]), atoi(argv[4]));
	if (!strcmp(cmd, "mkfiles") && argc == 4)
		return cmd_mkfiles(argv[2], atol(argv[3]));
	usage();
	return 2;
}
