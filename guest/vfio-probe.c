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
#define VDEV_PROGRAM "vfio"
#include "vfio-common.h"

#define MAX_OPS 64

struct op {
	int write;
	unsigned region;
	uint64_t offset;
	unsigned width;
	uint64_t value;
};

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

static void do_op(int device, const struct op *op, const struct vfio_region_info *regions, unsigned num_regions)
{
	uint64_t value = op->value;
	const char *kind = op->write ? "vfio.write" : "vfio.read";
	if (op->region >= num_regions) {
		errno = EINVAL;
		report_error(op->write ? "pwrite" : "pread");
		return;
	}
	off_t position = regions[op->region].offset + op->offset;
	ssize_t n = op->write ? pwrite(device, &value, op->width, position) : pread(device, &value, op->width, position);
	if (n != (ssize_t)op->width) {
		if (n >= 0)
			errno = EIO;
		report_error(op->write ? "pwrite" : "pread");
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

	struct vfio_dev dev;
	if (vfio_open(addr, &dev) < 0)
		goto done;
	report("\"kind\":\"vfio.device\",\"addr\":\"%s\",\"group\":%d,\"flags\":%u,\"num_regions\":%u,\"num_irqs\":%u",
	       addr, dev.group_id, dev.info.flags, dev.info.num_regions, dev.info.num_irqs);

	struct vfio_region_info *regions = calloc(dev.info.num_regions, sizeof(*regions));
	for (unsigned i = 0; i < dev.info.num_regions; i++) {
		if (vfio_region(&dev, i, &regions[i]) < 0) {
			if (errno == EINVAL) /* e.g. the VGA region of a device that is no VGA */
				report("\"kind\":\"vfio.region\",\"index\":%u,\"absent\":true", i);
			else
				report_error("VFIO_DEVICE_GET_REGION_INFO");
			regions[i].size = 0;
			continue;
		}
		report("\"kind\":\"vfio.region\",\"index\":%u,\"size\":%llu,\"offset\":%llu,\"flags\":%u", i,
		       (unsigned long long)regions[i].size, (unsigned long long)regions[i].offset, regions[i].flags);
	}
	for (unsigned i = 0; i < dev.info.num_irqs; i++) {
		struct vfio_irq_info irq = {.argsz = sizeof(irq), .index = i};
		if (ioctl(dev.fd, VFIO_DEVICE_GET_IRQ_INFO, &irq) < 0) {
			if (errno == EINVAL) /* e.g. the ERR index of a device without PCIe AER */
				report("\"kind\":\"vfio.irq\",\"index\":%u,\"absent\":true", i);
			else
				report_error("VFIO_DEVICE_GET_IRQ_INFO");
			continue;
		}
		report("\"kind\":\"vfio.irq\",\"index\":%u,\"count\":%u,\"flags\":%u", i, irq.count, irq.flags);
	}
	for (unsigned i = 0; i < num_ops; i++)
		do_op(dev.fd, &ops[i], regions, dev.info.num_regions);
done:
	report("\"kind\":\"vfio.done\",\"status\":%d", vdev_failures ? 1 : 0);
	return vdev_failures ? 1 : 0;
}
