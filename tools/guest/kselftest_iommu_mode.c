/*
 * Linked into every vfio selftest that tools/guest.sh builds: picks the
 * selftest library's IOMMU mode from $VDEV_IOMMU_MODE before main() runs.
 *
 * vfio_pci_device_test and vfio_pci_driver_test open their devices in the
 * library's default mode, iommufd, which Debian's kernels (no CONFIG_IOMMUFD)
 * cannot give them; guest/bin/kselftest sets VDEV_IOMMU_MODE to
 * vfio_type1v2_iommu there.  The library keeps the default in a global
 * pointer, so setting it is all it takes: no selftest source is changed.
 * Without the variable the default stays as upstream has it.
 */
#include <stdlib.h>

extern const char *default_iommu_mode;

__attribute__((constructor)) static void vdev_iommu_mode_from_environment(void)
{
	const char *mode = getenv("VDEV_IOMMU_MODE");

	if (mode && *mode)
		default_iommu_mode = mode;
}
