/*
 * vdev's serving loop: wait for a client's message and hand it to
 * libvfio-user, with no interpreter in between.
 *
 * A device's serving thread spends its life here.  Python runs only inside
 * the library's callbacks (the device's handlers) and when this loop returns
 * for something it cannot decide itself: another thread raised the lock's
 * attention flag (to stop the thread, or for a call it deferred because this
 * thread held the context lock), vfu_run_ctx failed (a hang-up, a pending
 * quiesce), or a SET_IRQS went by while the model waits for eventfds.  Per
 * message that leaves one blocking receive, the library's own work and the
 * handler, as in libvfio-user's C samples.
 *
 * The loop waits for a message with a blocking MSG_PEEK receive of one byte,
 * not poll(2): with the server on a CPU of its own, which sleeps between
 * messages, waking in poll cost about a fifth of the C sample's throughput
 * on this project's machines, and waking in a receive nothing (measured with
 * a C server of the same register served both ways).  The context is still
 * non-blocking for libvfio-user, so the peek is the only place the loop
 * sleeps, and it sleeps without the context lock.  Whoever stops the thread
 * raises attention and shuts the connection down for reading, which ends
 * the peek.
 *
 * The context lock lives here too, so that this loop can take it without the
 * interpreter: a recursive mutex (a handler may call back into the library)
 * and the attention flag.  Its memory belongs to the Python object that
 * allocated it (vdev_lock_size bytes), which also initialises it.
 *
 * Handing an access to Trio (an `async` handler) is done here as well: a
 * callback wakes the device's Trio task and waits for it, and the task wakes
 * the callback back, each through an eventfd and each without the
 * interpreter's lock held, so the thread woken never finds that lock taken
 * by its waker and has to switch back and forth for it.  Woken from Python
 * instead (os.eventfd_write, a threading.Lock's release), the woken thread
 * ran at once on a shared CPU, stopped on the interpreter's lock, and gave
 * the CPU back: 7.4-8.0 context switches of the server per access, against
 * 4.6-4.7 this way.  With the server on a CPU of its own that lifted async
 * reads from 0.63-0.68 to 0.69-0.74 of the C sample's rate (five runs each,
 * alternating; on one core the CPU per access did not move).
 *
 * Nothing here depends on which libvfio-user build is loaded: the loop gets
 * vfu_run_ctx as a function pointer.
 */

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <unistd.h>

/* What vdev_serve returns besides -errno from vfu_run_ctx. */
enum {
    VDEV_SET_IRQS = 2,  /* a SET_IRQS was served while the caller watched for one */
    VDEV_ATTENTION = 3, /* another thread raised the attention flag */
};

/* The vfio-user command code of SET_IRQS, and where a header keeps it. */
#define VFIO_USER_DEVICE_SET_IRQS 8
#define HEADER_SIZE 16

struct vdev_lock {
    pthread_mutex_t mutex;
    atomic_int attention;
};

size_t vdev_lock_size(void)
{
    return sizeof(struct vdev_lock);
}

int vdev_lock_init(struct vdev_lock *lock)
{
    pthread_mutexattr_t attr;
    int err;

    atomic_init(&lock->attention, 0);
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
    err = pthread_mutex_init(&lock->mutex, &attr);
    pthread_mutexattr_destroy(&attr);
    return -err;
}

void vdev_lock_acquire(struct vdev_lock *lock)
{
    pthread_mutex_lock(&lock->mutex);
}

int vdev_lock_try(struct vdev_lock *lock)
{
    return pthread_mutex_trylock(&lock->mutex) == 0;
}

void vdev_lock_release(struct vdev_lock *lock)
{
    pthread_mutex_unlock(&lock->mutex);
}

/* Ask the serving loop to return to Python after its current message. */
void vdev_lock_raise_attention(struct vdev_lock *lock)
{
    atomic_store(&lock->attention, 1);
}

/* Whether attention was raised since the last call; lowers the flag. */
int vdev_lock_take_attention(struct vdev_lock *lock)
{
    return atomic_exchange(&lock->attention, 0);
}

/* Add one to the eventfd `fd`: wakes whoever waits on it.  0 or -errno. */
int vdev_wake(int fd)
{
    uint64_t one = 1;

    return write(fd, &one, sizeof(one)) == sizeof(one) ? 0 : -errno;
}

/*
 * Wake `wake_fd` (unless it is negative), then block until the blocking
 * eventfd `done_fd` is signalled, and consume that signal.  0 or -errno.
 */
int vdev_wake_and_wait(int wake_fd, int done_fd)
{
    uint64_t count;

    if (wake_fd >= 0 && vdev_wake(wake_fd) < 0) {
        return -errno;
    }
    while (read(done_fd, &count, sizeof(count)) < 0) {
        if (errno != EINTR) {
            return -errno;
        }
    }
    return 0;
}

/* Whether the message waiting on `connection` is a SET_IRQS (peeked, not consumed). */
static int next_is_set_irqs(int connection)
{
    uint8_t header[HEADER_SIZE];
    ssize_t got = recv(connection, header, sizeof(header), MSG_PEEK | MSG_DONTWAIT);

    if (got < HEADER_SIZE) {
        return 0;
    }
    return (header[2] | header[3] << 8) == VFIO_USER_DEVICE_SET_IRQS;
}

/*
 * Serve the client on `connection` until something needs the caller: one of
 * the VDEV_* codes above, or -errno when vfu_run_ctx fails with anything but
 * EAGAIN.  `run` is vfu_run_ctx and `context` its vfu_ctx_t; each call holds
 * `lock`.  Attention raised while the loop waits is seen before the next
 * message is served, so the caller may change `watch_set_irqs` in time.
 * With `watch_set_irqs` set, each message's command is peeked first.
 */
int vdev_serve(int (*run)(void *), void *context, int connection, struct vdev_lock *lock, int watch_set_irqs)
{
    for (;;) {
        int set_irqs, result, code;
        char first;

        /* A receive timeout (the connection has one, against stalled
         * clients) or a signal only brings us back here. */
        if (recv(connection, &first, 1, MSG_PEEK) < 0 &&
            (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) && !atomic_load(&lock->attention)) {
            continue;
        }
        if (atomic_load(&lock->attention)) {
            return VDEV_ATTENTION;
        }
        /* A message, or the end of the stream, which vfu_run_ctx reports. */
        set_irqs = watch_set_irqs && next_is_set_irqs(connection);
        pthread_mutex_lock(&lock->mutex);
        result = run(context);
        code = result < 0 ? errno : 0;
        pthread_mutex_unlock(&lock->mutex);
        if (result < 0 && code != EAGAIN && code != EWOULDBLOCK) {
            return -code;
        }
        if (set_irqs) {
            return VDEV_SET_IRQS;
        }
        if (atomic_load(&lock->attention)) {
            return VDEV_ATTENTION; /* raised while we held the lock: a deferred call waits */
        }
    }
}
