/*
 * msix-probe: receive a device's MSI-X interrupts in the guest, through VFIO.
 *
 *   msix-probe DDDD:BB:DD.F VECTORS
 *
 * The device must already be bound to vfio-pci and ring MSI-X vector n when n
 * is written to its doorbell, the 32-bit register at BAR0+0.  msix-probe sets
 * bus mastering (an MSI is a memory write by the device: without it QEMU drops
 * the message) and asks VFIO for VECTORS MSI-X vectors, each signalling an eventfd of its own
 * (VFIO_DEVICE_SET_IRQS).  The guest kernel then programs and unmasks the
 * vectors in the MSI-X table, which QEMU's vfio-user-pci emulates, and enables
 * MSI-X; QEMU installs an eventfd per vector with the vfio-user server.  Then,
 * for each vector in turn, it rings the doorbell (pwrite on the BAR0 region)
 * and waits, at most 5 s, until that vector's eventfd fires — the interrupt
 * went device -> vfio-user server -> QEMU -> guest MSI-X -> vfio-pci's handler.
 *
 * Output, one line each (see vdev/qemu/guest.py for the framing):
 *   VDEV {"kind":"msix.enabled","vectors":N}
 *   VDEV {"kind":"msix.vector","vector":N,"count":N}   count: eventfd value read
 *   VDEV {"kind":"msix.error","op":"...","errno":N,"message":"..."}
 *   VDEV {"kind":"msix.done","status":N}
 * Exit status 0 when every vector arrived, 1 otherwise.
 */
#define _GNU_SOURCE
#define VDEV_PROGRAM "msix"
#include "vfio-common.h"

#include <linux/pci_regs.h>
#include <poll.h>
#include <sys/eventfd.h>

#define MAX_VECTORS 64
#define WAIT_MS 5000

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s DDDD:BB:DD.F VECTORS\n", argv[0]);
		return 2;
	}
	const char *addr = argv[1];
	unsigned vectors = strtoul(argv[2], NULL, 0);
	if (vectors == 0 || vectors > MAX_VECTORS) {
		fprintf(stderr, "%s: VECTORS must be 1..%d\n", argv[0], MAX_VECTORS);
		return 2;
	}

	struct vfio_dev dev;
	struct vfio_region_info bar0;
	int fds[MAX_VECTORS];
	if (vfio_open(addr, &dev) < 0)
		goto done;
	struct vfio_region_info config;
	if (vfio_region(&dev, VFIO_PCI_BAR0_REGION_INDEX, &bar0) < 0 ||
	    vfio_region(&dev, VFIO_PCI_CONFIG_REGION_INDEX, &config) < 0) {
		report_error("VFIO_DEVICE_GET_REGION_INFO");
		goto done;
	}
	uint16_t command;
	if (pread(dev.fd, &command, sizeof(command), config.offset + PCI_COMMAND) != sizeof(command)) {
		report_error("pread COMMAND");
		goto done;
	}
	command |= PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
	if (pwrite(dev.fd, &command, sizeof(command), config.offset + PCI_COMMAND) != sizeof(command)) {
		report_error("pwrite COMMAND");
		goto done;
	}

	char buffer[sizeof(struct vfio_irq_set) + sizeof(int) * MAX_VECTORS];
	struct vfio_irq_set *set = (struct vfio_irq_set *)buffer;
	*set = (struct vfio_irq_set){
		.argsz = sizeof(struct vfio_irq_set) + sizeof(int) * vectors,
		.flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
		.index = VFIO_PCI_MSIX_IRQ_INDEX,
		.start = 0,
		.count = vectors,
	};
	for (unsigned n = 0; n < vectors; n++) {
		fds[n] = eventfd(0, EFD_CLOEXEC);
		if (fds[n] < 0) {
			report_error("eventfd");
			goto done;
		}
	}
	memcpy(set->data, fds, sizeof(int) * vectors);
	if (ioctl(dev.fd, VFIO_DEVICE_SET_IRQS, set) < 0) {
		report_error("VFIO_DEVICE_SET_IRQS");
		goto done;
	}
	report("\"kind\":\"msix.enabled\",\"vectors\":%u", vectors);

	for (unsigned n = 0; n < vectors; n++) {
		uint32_t doorbell = n;
		if (pwrite(dev.fd, &doorbell, sizeof(doorbell), bar0.offset) != sizeof(doorbell)) {
			report_error("pwrite doorbell");
			continue;
		}
		struct pollfd ready = {.fd = fds[n], .events = POLLIN};
		int got = poll(&ready, 1, WAIT_MS);
		if (got <= 0) {
			if (got == 0)
				errno = ETIMEDOUT;
			report_error("poll vector");
			continue;
		}
		eventfd_t count;
		if (eventfd_read(fds[n], &count) < 0) {
			report_error("eventfd_read");
			continue;
		}
		report("\"kind\":\"msix.vector\",\"vector\":%u,\"count\":%llu", n, (unsigned long long)count);
	}
done:
	report("\"kind\":\"msix.done\",\"status\":%d", vdev_failures ? 1 : 0);
	return vdev_failures ? 1 : 0;
}
