/*
 * vfio-common.h: what every guest program that reaches a device through VFIO
 * needs, shared so that each program states only its experiment: finding a
 * PCI function in sysfs, binding it to vfio-pci, opening it.  Steps that
 * fail are reported with report_error() (report.h).
 *
 * Opening a device is the classic container/group sequence (the one QEMU
 * uses): find the IOMMU group in sysfs, open /dev/vfio/vfio and the group,
 * attach the group with the type1v2 IOMMU, ask the group for the device fd.
 */
#ifndef VDEV_VFIO_COMMON_H
#define VDEV_VFIO_COMMON_H

#include "report.h"

#include <dirent.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/ioctl.h>

/* A sysfs attribute of a PCI function as a number (vendor, device, ...); -1 when unreadable. */
static inline long pci_attribute(const char *addr, const char *name)
{
	char path[PATH_MAX], text[32] = "";
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/%s", addr, name);
	FILE *file = fopen(path, "r");
	if (!file)
		return -1;
	char *got = fgets(text, sizeof(text), file);
	fclose(file);
	return got ? strtol(text, NULL, 0) : -1;
}

/* The first PCI function with this vendor and device ID, its address in addr; -1 (ENODEV) if none. */
static inline int pci_find(unsigned vendor, unsigned device, char *addr, size_t size)
{
	DIR *dir = opendir("/sys/bus/pci/devices");
	if (!dir)
		return -1;
	int found = -1;
	for (struct dirent *entry; found < 0 && (entry = readdir(dir));) {
		if (entry->d_name[0] == '.')
			continue;
		if (pci_attribute(entry->d_name, "vendor") == (long)vendor &&
		    pci_attribute(entry->d_name, "device") == (long)device) {
			snprintf(addr, size, "%s", entry->d_name);
			found = 0;
		}
	}
	closedir(dir);
	if (found < 0)
		errno = ENODEV;
	return found;
}

/* The name of the driver bound to addr into name ("" when none). */
static inline void pci_driver(const char *addr, char *name, size_t size)
{
	char link[PATH_MAX], target[PATH_MAX];
	snprintf(link, sizeof(link), "/sys/bus/pci/devices/%s/driver", addr);
	ssize_t n = readlink(link, target, sizeof(target) - 1);
	name[0] = '\0';
	if (n > 0) {
		target[n] = '\0';
		snprintf(name, size, "%s", basename(target));
	}
}

static inline int write_text(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY);
	if (fd < 0)
		return -1;
	ssize_t n = write(fd, text, strlen(text));
	int saved = errno;
	close(fd);
	errno = saved;
	return n == (ssize_t)strlen(text) ? 0 : -1;
}

/*
 * Bind addr to vfio-pci through driver_override (unbinding its current
 * driver first): unlike new_id, this binds exactly this function and no
 * other device with the same IDs.
 */
static inline int vfio_bind(const char *addr)
{
	char driver[64], path[PATH_MAX];
	pci_driver(addr, driver, sizeof(driver));
	if (strcmp(driver, "vfio-pci") == 0)
		return 0;
	if (driver[0]) {
		snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver/unbind", addr);
		if (write_text(path, addr) < 0)
			return -1;
	}
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver_override", addr);
	if (write_text(path, "vfio-pci") < 0 || write_text("/sys/bus/pci/drivers_probe", addr) < 0)
		return -1;
	pci_driver(addr, driver, sizeof(driver));
	if (strcmp(driver, "vfio-pci") != 0) {
		errno = ENODEV;
		return -1;
	}
	return 0;
}

static inline int iommu_group(const char *addr)
{
	char link[PATH_MAX], target[PATH_MAX];
	snprintf(link, sizeof(link), "/sys/bus/pci/devices/%s/iommu_group", addr);
	ssize_t n = readlink(link, target, sizeof(target) - 1);
	if (n < 0)
		return -1;
	target[n] = '\0';
	return atoi(basename(target));
}

struct vfio_dev {
	int group_id;
	int container;
	int group;
	int fd;
	struct vfio_device_info info;
};

/* Open addr (already bound to vfio-pci); each failing step is reported and -1 returned. */
static inline int vfio_open(const char *addr, struct vfio_dev *dev)
{
	dev->group_id = iommu_group(addr);
	if (dev->group_id < 0) {
		report_error("iommu_group");
		return -1;
	}
	dev->container = open("/dev/vfio/vfio", O_RDWR);
	if (dev->container < 0) {
		report_error("open /dev/vfio/vfio");
		return -1;
	}
	if (ioctl(dev->container, VFIO_GET_API_VERSION) != VFIO_API_VERSION) {
		errno = EPROTO;
		report_error("VFIO_GET_API_VERSION");
		return -1;
	}
	if (ioctl(dev->container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) <= 0) {
		errno = ENOTSUP;
		report_error("VFIO_CHECK_EXTENSION");
		return -1;
	}
	char path[64];
	snprintf(path, sizeof(path), "/dev/vfio/%d", dev->group_id);
	dev->group = open(path, O_RDWR);
	if (dev->group < 0) {
		report_error("open group");
		return -1;
	}
	struct vfio_group_status status = {.argsz = sizeof(status)};
	if (ioctl(dev->group, VFIO_GROUP_GET_STATUS, &status) < 0) {
		report_error("VFIO_GROUP_GET_STATUS");
		return -1;
	}
	if (!(status.flags & VFIO_GROUP_FLAGS_VIABLE)) {
		errno = EBUSY;
		report_error("group not viable");
		return -1;
	}
	if (ioctl(dev->group, VFIO_GROUP_SET_CONTAINER, &dev->container) < 0) {
		report_error("VFIO_GROUP_SET_CONTAINER");
		return -1;
	}
	if (ioctl(dev->container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU) < 0) {
		report_error("VFIO_SET_IOMMU");
		return -1;
	}
	dev->fd = ioctl(dev->group, VFIO_GROUP_GET_DEVICE_FD, addr);
	if (dev->fd < 0) {
		report_error("VFIO_GROUP_GET_DEVICE_FD");
		return -1;
	}
	dev->info = (struct vfio_device_info){.argsz = sizeof(dev->info)};
	if (ioctl(dev->fd, VFIO_DEVICE_GET_INFO, &dev->info) < 0) {
		report_error("VFIO_DEVICE_GET_INFO");
		return -1;
	}
	return 0;
}

/* Region index's size, flags and offset in the device fd; -1 with errno (EINVAL: no such region). */
static inline int vfio_region(const struct vfio_dev *dev, unsigned index, struct vfio_region_info *region)
{
	*region = (struct vfio_region_info){.argsz = sizeof(*region), .index = index};
	return ioctl(dev->fd, VFIO_DEVICE_GET_REGION_INFO, region);
}

#endif
