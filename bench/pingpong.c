/*
 * The physical floor for a request/reply over a UNIX socket on this machine:
 * two processes bounce a 16-byte message (a vfio-user header's size) back
 * and forth.  Prints round trips per second.
 *
 * usage: pingpong ROUND_TRIPS
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void exchange(int fd, long rounds, int first)
{
    char message[16] = {0};
    for (long i = 0; i < rounds; i++) {
        if (first && write(fd, message, sizeof message) != sizeof message)
            exit(1);
        if (read(fd, message, sizeof message) != sizeof message)
            exit(1);
        if (!first && write(fd, message, sizeof message) != sizeof message)
            exit(1);
    }
}

int main(int argc, char **argv)
{
    long rounds = argc > 1 ? atol(argv[1]) : 20000;
    int pair[2];
    struct timespec start, end;

    if (socketpair(AF_UNIX, SOCK_STREAM, 0, pair) != 0)
        return 1;
    pid_t child = fork();
    if (child == 0) {
        close(pair[0]);
        exchange(pair[1], rounds, 0);
        return 0;
    }
    close(pair[1]);
    clock_gettime(CLOCK_MONOTONIC, &start);
    exchange(pair[0], rounds, 1);
    clock_gettime(CLOCK_MONOTONIC, &end);
    waitpid(child, NULL, 0);
    double seconds = (end.tv_sec - start.tv_sec) + (end.tv_nsec - start.tv_nsec) / 1e9;
    printf("%.1f\n", rounds / seconds);
    return 0;
}
