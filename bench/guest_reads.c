/*
 * guest-reads: the guest side of make bench's guest row.
 *
 * Reads one 4-byte register of a PCI device's I/O BAR in a loop, with the
 * `inl` instruction from user space (ioperm), the way a driver's polling
 * loop would: every read traps to QEMU, which forwards it to the device's
 * vfio-user server.  The port comes from the device's sysfs `resource`
 * file, and the device is enabled (I/O decoding) through sysfs first unless
 * a driver has it.
 *
 *   guest-reads SYSFS_DEVICE_DIR BAR OFFSET COUNT
 *
 * Reports, in vdev's guest result format (guest/report.h):
 *   bench.start  {port}                      just before the timed loop
 *   bench.reads  {count, seconds, last}      after it
 *   bench.error  {op, errno, message}        on failure (exit status 1)
 *
 * Built statically by the benchmark (bench/guest.py) and added to the guest
 * with the harness's `files`, so the shared initramfs is never rebuilt.
 */
#define VDEV_PROGRAM "bench"
#include "report.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/io.h>
#include <time.h>

#define IORESOURCE_IO 0x100
#define WARM_UP 1000

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Turn on decoding; EBUSY means a driver has the device, and so has enabled it already. */
static int enable(const char *device)
{
	char path[512];
	snprintf(path, sizeof(path), "%s/enable", device);
	int fd = open(path, O_WRONLY);
	if (fd < 0 || (write(fd, "1", 1) < 0 && errno != EBUSY)) {
		report_error("enable");
		return -1;
	}
	close(fd);
	return 0;
}

static long io_bar(const char *device, int bar)
{
	char path[512];
	unsigned long long start = 0, end = 0, flags = 0;
	snprintf(path, sizeof(path), "%s/resource", device);
	FILE *f = fopen(path, "r");
	if (!f) {
		report_error("open resource");
		return -1;
	}
	for (int i = 0; i <= bar; i++) {
		if (fscanf(f, "%llx %llx %llx", &start, &end, &flags) != 3) {
			fclose(f);
			errno = EINVAL;
			report_error("parse resource");
			return -1;
		}
	}
	fclose(f);
	if (!(flags & IORESOURCE_IO) || !start) {
		errno = EINVAL;
		report_error("BAR is not a placed I/O BAR");
		return -1;
	}
	return (long)start;
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: %s SYSFS_DEVICE_DIR BAR OFFSET COUNT\n", argv[0]);
		return 2;
	}
	const char *device = argv[1];
	long base = io_bar(device, atoi(argv[2]));
	long count = atol(argv[4]);
	if (base < 0 || enable(device) < 0)
		return 1;
	unsigned short port = (unsigned short)(base + atol(argv[3]));
	if (ioperm(port, 4, 1) < 0) {
		report_error("ioperm");
		return 1;
	}
	unsigned int value = 0;
	for (int i = 0; i < WARM_UP; i++)
		value = inl(port);
	report("\"kind\":\"bench.start\",\"port\":%u", port);
	double started = now();
	for (long i = 0; i < count; i++)
		value = inl(port);
	double seconds = now() - started;
	report("\"kind\":\"bench.reads\",\"count\":%ld,\"seconds\":%.6f,\"last\":%u", count, seconds, value);
	return 0;
}
