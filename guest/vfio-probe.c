/*
 * vfio-probe: open a PCI device through the guest's VFIO group interface and
 * report what VFIO says about it, as machine-readable lines.
 *
 *   vfio-probe [-r REGION:OFFSET:WIDTH]... [-w REGION:OFFSET:WIDTH:VALUE]... DDDD:BB:DD.F
 *
 * The device must already be bound to vfio-pci.  Steps: find the device's
 * IOMMU group in sysfs, open the container and the group, attach the group to
 * the container with the type1v2 IOMMU, get the device fd, then report the
 * device, every region and every IRQ index.  Each -r / -w is then done in
 * command-line order with pread/pwrite on the device fd at the region's
 * offset (the way QEMU reaches a trapped BAR).  Offsets and values accept
 * C notation (0x...).  WIDTH is 1, 2, 4 or 8.
 *
 * Output, one line each (see vdev/qemu/guest.py for the framing):
 *   VDEV {"kind":"vfio.device","addr":...,"group":N,"flags":N,"num_regions":N,"num_irqs":N}
 *   VDEV {"kind":"vfio.region","index":N,"size":N,"offset":N,"flags":N}
 *   VDEV {"kind":"vfio.irq","index":N,"count":N,"flags":N}
 *   (a region or IRQ index the device does not have, where VFIO answers
 *   EINVAL, is reported as {"kind":...,"index":N,"absent":true})
 *   VDEV {"kind":"vfio.read","region":N,"offset":N,"width":N,"value":N}
 *   VDEV {"kind":"vfio.write","region":N,"offset":N,"width":N,"value":N}
 *   VDEV {"kind":"vfio.error","op":"...","errno":N,"message":"..."}
 *   VDEV {"kind":"vfio.done","status":N}
 * Numbers are JSON integers.  Exit status 0 when every step worked, 1 otherwise.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <stdarg.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define MAX_OPS 64

struct op {
	int write;
	unsigned region;
	uint64_t offset;
	unsigned width;
	uint64_t value;
};

static int failures;

/* One result line, written with a single write(2) so that it is not split. */
static void report(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void report(const char *fmt, ...)
{
	char line[1024];
	va_list ap;
	int n = snprintf(line, sizeof(line), "VDEV {");
	va_start(ap, fmt);
	n += vsnprintf(line + n, sizeof(line) - n - 3, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof(line) - 3)
		n = sizeof(line) - 3;
	line[n++] = '}';
	line[n++] = '\n';
	fflush(stdout);
	if (write(STDOUT_FILENO, line, n) < 0)
		exit(2);
}

static void error(const char *op)
{
	int saved = errno;
	failures++;
	report("\"kind\":\"vfio.error\",\"op\":\"%s\",\"errno\":%d,\"message\":\"%s\"", op, saved, strerror(saved));
}

static int parse_op(char *text, int write, struct op *op)
{
	char *fields[4];
	unsigned want = write ? 4 : 3, n = 0;
	for (char *field = strtok(text, ":"); field && n < 4; field = strtok(NULL, ":"))
		fields[n++] = field;
	if (n != want)
		return -1;
	op->write = write;
	op->region = strtoul(fields[0], NULL, 0);
	op->offset = strtoull(fields[1], NULL, 0);
	op->width = strtoul(fields[2], NULL, 0);
	op->value = write ? strtoull(fields[3], NULL, 0) : 0;
	return (op->width == 1 || op->width == 2 || op->width == 4 || op->width == 8) ? 0 : -1;
}

static int iommu_group(const char *addr)
{
	char link[PATH_MAX], target[PATH_MAX];
	snprintf(link, sizeof(link), "/sys/bus/pci/devices/%s/iommu_group", addr);
	ssize_t n = readlink(link, target, sizeof(target) - 1);
	if (n < 0)
		return -1;
	target[n] = '\0';
	return atoi(basename(target));
}

static void do_op(int device, const struct op *op, const struct vfio_region_info *regions, unsigned num_regions)
{
	uint64_t value = op->value;
	const char *kind = op->write ? "vfio.write" : "vfio.read";
	if (op->region >= num_regions) {
		errno = EINVAL;
		error(op->write ? "pwrite" : "pread");
		return;
	}
	off_t position = regions[op->region].offset + op->offset;
	ssize_t n = op->write ? pwrite(device, &value, op->width, position) : pread(device, &value, op->width, position);
	if (n != (ssize_t)op->width) {
		if (n >= 0)
			errno = EIO;
		error(op->write ? "pwrite" : "pread");
		return;
	}
	if (op->width < 8)
		value &= (UINT64_C(1) << (8 * op->width)) - 1;
	report("\"kind\":\"%s\",\"region\":%u,\"offset\":%llu,\"width\":%u,\"value\":%llu", kind, op->region,
	       (unsigned long long)op->offset, op->width, (unsigned long long)value);
}

int main(int argc, char **argv)
{
	struct op ops[MAX_OPS];
	unsigned num_ops = 0;
	int opt;
	while ((opt = getopt(argc, argv, "r:w:")) != -1) {
		if (num_ops == MAX_OPS || parse_op(optarg, opt == 'w', &ops[num_ops]) < 0) {
			fprintf(stderr, "usage: %s [-r REGION:OFFSET:WIDTH]... [-w REGION:OFFSET:WIDTH:VALUE]... ADDR\n",
				argv[0]);
			return 2;
		}
		num_ops++;
	}
	if (optind != argc - 1) {
		fprintf(stderr, "usage: %s [-r REGION:OFFSET:WIDTH]... [-w REGION:OFFSET:WIDTH:VALUE]... ADDR\n", argv[0]);
		return 2;
	}
	const char *addr = argv[optind];

	int group_id = iommu_group(addr);
	if (group_id < 0) {
		error("iommu_group");
		goto done;
	}
	int container = open("/dev/vfio/vfio", O_RDWR);
	if (container < 0) {
		error("open /dev/vfio/vfio");
		goto done;
	}
	if (ioctl(container, VFIO_GET_API_VERSION) != VFIO_API_VERSION) {
		errno = EPROTO;
		error("VFIO_GET_API_VERSION");
		goto done;
	}
	if (ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) <= 0) {
		errno = ENOTSUP;
		error("VFIO_CHECK_EXTENSION");
		goto done;
	}
	char path[64];
	snprintf(path, sizeof(path), "/dev/vfio/%d", group_id);
	int group = open(path, O_RDWR);
	if (group < 0) {
		error("open group");
		goto done;
	}
	struct vfio_group_status status = {.argsz = sizeof(status)};
	if (ioctl(group, VFIO_GROUP_GET_STATUS, &status) < 0) {
		error("VFIO_GROUP_GET_STATUS");
		goto done;
	}
	if (!(status.flags & VFIO_GROUP_FLAGS_VIABLE)) {
		errno = EBUSY;
		error("group not viable");
		goto done;
	}
	if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container) < 0) {
		error("VFIO_GROUP_SET_CONTAINER");
		goto done;
	}
	if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU) < 0) {
		error("VFIO_SET_IOMMU");
		goto done;
	}
	int device = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, addr);
	if (device < 0) {
		error("VFIO_GROUP_GET_DEVICE_FD");
		goto done;
	}
	struct vfio_device_info info = {.argsz = sizeof(info)};
	if (ioctl(device, VFIO_DEVICE_GET_INFO, &info) < 0) {
		error("VFIO_DEVICE_GET_INFO");
		goto done;
	}
	report("\"kind\":\"vfio.device\",\"addr\":\"%s\",\"group\":%d,\"flags\":%u,\"num_regions\":%u,\"num_irqs\":%u",
	       addr, group_id, info.flags, info.num_regions, info.num_irqs);

	struct vfio_region_info *regions = calloc(info.num_regions, sizeof(*regions));
	for (unsigned i = 0; i < info.num_regions; i++) {
		regions[i].argsz = sizeof(regions[i]);
		regions[i].index = i;
		if (ioctl(device, VFIO_DEVICE_GET_REGION_INFO, &regions[i]) < 0) {
			if (errno == EINVAL) /* e.g. the VGA region of a device that is no VGA */
				report("\"kind\":\"vfio.region\",\"index\":%u,\"absent\":true", i);
			else
				error("VFIO_DEVICE_GET_REGION_INFO");
			regions[i].size = 0;
			continue;
		}
		report("\"kind\":\"vfio.region\",\"index\":%u,\"size\":%llu,\"offset\":%llu,\"flags\":%u", i,
		       (unsigned long long)regions[i].size, (unsigned long long)regions[i].offset, regions[i].flags);
	}
	for (unsigned i = 0; i < info.num_irqs; i++) {
		struct vfio_irq_info irq = {.argsz = sizeof(irq), .index = i};
		if (ioctl(device, VFIO_DEVICE_GET_IRQ_INFO, &irq) < 0) {
			if (errno == EINVAL) /* e.g. the ERR index of a device without PCIe AER */
				report("\"kind\":\"vfio.irq\",\"index\":%u,\"absent\":true", i);
			else
				error("VFIO_DEVICE_GET_IRQ_INFO");
			continue;
		}
		report("\"kind\":\"vfio.irq\",\"index\":%u,\"count\":%u,\"flags\":%u", i, irq.count, irq.flags);
	}
	for (unsigned i = 0; i < num_ops; i++)
		do_op(device, &ops[i], regions, info.num_regions);
done:
	report("\"kind\":\"vfio.done\",\"status\":%d", failures ? 1 : 0);
	return failures ? 1 : 0;
}
