/*
 * munmap-race: munmap of BAR mappings racing vfio-pci's memory enable, run in
 * a guest against vdev's membar device.
 *
 *   munmap-race [-t THREADS] [-c CYCLES] [ADDR]
 *
 * Why: a kernel that maps a device's vmas at the enabling COMMAND write (the
 * prefault variant in variants/) walks vmas it tracks, under each mm's
 * mmap_lock held for reading.  In 6.1, munmap takes a vma out of the mm's
 * tree, then downgrades its mmap_lock to a read lock and tears the range's
 * page tables down before it closes the vma; until the close the vma is
 * still on vfio-pci's list.  A prefault that remaps such a vma leaves device
 * page-table entries in a range that no vma covers any more.
 *
 * How: the main thread clears and sets MEM CYCLES times (config writes,
 * nothing between them).  THREADS churners each loop: map BAR0, read its
 * first page (a fault while MEM is on puts the vma on vfio-pci's list; a
 * SIGBUS while MEM is off is expected and counted), unmap it, then map
 * anonymous memory at the same address (MAP_FIXED_NOREPLACE) and read its
 * first and last page.  Fresh anonymous memory reads 0; anything else — or
 * a SIGBUS — comes from a device entry left behind: a stray mapping.
 * BAR0 is filled with a non-zero pattern first, so that a stray entry to it
 * reads non-zero while MEM is on.
 *
 * Output (VDEV lines):
 *   VDEV {"kind":"race.device","addr":...,"bar0_size":N}
 *   VDEV {"kind":"race.stray","thread":N,"value":N,"sigbus":0|1}   (the first few)
 *   VDEV {"kind":"race.done","status":N,"cycles":N,"threads":N,"maps":N,"bar_sigbus":N,
 *         "anon_checks":N,"anon_taken":N,"stray":N}
 *     (anon_taken: the address was taken by another thread's mapping; no check then)
 * Exit status 0 when every cycle ran and no stray mapping was seen.
 */
#define _GNU_SOURCE
#define VDEV_PROGRAM "race"

#include <fcntl.h>
#include <limits.h>
#include <linux/pci_regs.h>
#include <linux/vfio.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "report.h"
#include "vfio-common.h"

#define MEMBAR_VENDOR 0x1b36
#define MEMBAR_DEVICE 0x0f01
#define PAGE 4096
#define MAX_THREADS 16
#define MAX_STRAY_REPORTS 8
#define PATTERN 0x5a5a5a5a5a5a5a5aULL

static struct vfio_dev dev;
static struct vfio_region_info config_region, bar0_region;
static uint16_t command;
static _Atomic int stop;
static _Atomic uint64_t maps, bar_sigbus, anon_checks, anon_taken, stray;

/* volatile: the loads it guards are volatile, and the stores around them must not be moved or dropped. */
static __thread sigjmp_buf *volatile tl_jump;

static void on_sigbus(int sig)
{
	(void)sig;
	if (tl_jump == NULL)
		_exit(3);
	siglongjmp(*tl_jump, 1);
}

/* Load a word; -1 on SIGBUS. */
static int guarded_load(const uint8_t *address, uint64_t *value)
{
	sigjmp_buf here;
	if (sigsetjmp(here, 1)) {
		tl_jump = NULL;
		return -1;
	}
	tl_jump = &here;
	*value = *(const volatile uint64_t *)address;
	tl_jump = NULL;
	return 0;
}

static int set_memory(int on)
{
	uint16_t value = on ? (command | PCI_COMMAND_MEMORY) : (command & ~PCI_COMMAND_MEMORY);
	if (pwrite(dev.fd, &value, sizeof(value), config_region.offset + PCI_COMMAND) != (ssize_t)sizeof(value))
		return -1;
	command = value;
	return 0;
}

static uint8_t *map_bar0(void)
{
	return mmap(NULL, bar0_region.size, PROT_READ | PROT_WRITE, MAP_SHARED, dev.fd, (off_t)bar0_region.offset);
}

static void check_anonymous(int id, uint8_t *where)
{
	uint8_t *anon = mmap(where, bar0_region.size, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
	if (anon == MAP_FAILED || anon != where) {
		if (anon != MAP_FAILED)
			munmap(anon, bar0_region.size);
		atomic_fetch_add(&anon_taken, 1);
		return;
	}
	atomic_fetch_add(&anon_checks, 1);
	size_t offsets[2] = {0, bar0_region.size - PAGE};
	for (int i = 0; i < 2; i++) {
		uint64_t value = 0;
		int sigbus = guarded_load(anon + offsets[i], &value) < 0;
		if (sigbus || value != 0) {
			if (atomic_fetch_add(&stray, 1) < MAX_STRAY_REPORTS)
				report("\"kind\":\"race.stray\",\"thread\":%d,\"offset\":%zu,\"value\":%llu,\"sigbus\":%d", id,
				       offsets[i], (unsigned long long)value, sigbus);
		}
	}
	munmap(anon, bar0_region.size);
}

static void *churner(void *arg)
{
	int id = (int)(intptr_t)arg;
	while (!atomic_load(&stop)) {
		uint8_t *bar = map_bar0();
		if (bar == MAP_FAILED) {
			report_error("mmap BAR0");
			atomic_store(&stop, 1);
			break;
		}
		atomic_fetch_add(&maps, 1);
		uint64_t value;
		if (guarded_load(bar, &value) < 0)
			atomic_fetch_add(&bar_sigbus, 1);
		munmap(bar, bar0_region.size);
		check_anonymous(id, bar);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	unsigned threads = 4, cycles = 2000;
	int opt;
	while ((opt = getopt(argc, argv, "t:c:")) != -1) {
		switch (opt) {
		case 't': threads = (unsigned)atoi(optarg); break;
		case 'c': cycles = (unsigned)atoi(optarg); break;
		default:
			fprintf(stderr, "usage: munmap-race [-t THREADS] [-c CYCLES] [ADDR]\n");
			return 2;
		}
	}
	if (threads < 1 || threads > MAX_THREADS) {
		fprintf(stderr, "munmap-race: THREADS must be 1..%d\n", MAX_THREADS);
		return 2;
	}
	struct sigaction action = {.sa_handler = on_sigbus};
	sigaction(SIGBUS, &action, NULL);

	char addr[NAME_MAX + 1];
	unsigned done = 0;
	if (optind == argc - 1)
		snprintf(addr, sizeof(addr), "%s", argv[optind]);
	else if (pci_find(MEMBAR_VENDOR, MEMBAR_DEVICE, addr, sizeof(addr)) < 0) {
		report_error("find membar 1b36:0f01");
		goto out;
	}
	if (vfio_bind(addr) < 0) {
		report_error("bind to vfio-pci");
		goto out;
	}
	if (vfio_open(addr, &dev) < 0)
		goto out;
	if (vfio_region(&dev, VFIO_PCI_CONFIG_REGION_INDEX, &config_region) < 0 ||
	    vfio_region(&dev, VFIO_PCI_BAR0_REGION_INDEX, &bar0_region) < 0) {
		report_error("VFIO_DEVICE_GET_REGION_INFO");
		goto out;
	}
	if (pread(dev.fd, &command, sizeof(command), config_region.offset + PCI_COMMAND) != sizeof(command) ||
	    set_memory(1) < 0) {
		report_error("COMMAND");
		goto out;
	}
	report("\"kind\":\"race.device\",\"addr\":\"%s\",\"bar0_size\":%llu", addr,
	       (unsigned long long)bar0_region.size);
	uint8_t *fill = map_bar0();
	if (fill == MAP_FAILED) {
		report_error("mmap BAR0");
		goto out;
	}
	for (size_t offset = 0; offset < bar0_region.size; offset += sizeof(uint64_t))
		*(volatile uint64_t *)(fill + offset) = PATTERN;
	munmap(fill, bar0_region.size);

	pthread_t workers[MAX_THREADS];
	for (unsigned i = 0; i < threads; i++)
		pthread_create(&workers[i], NULL, churner, (void *)(intptr_t)i);
	for (done = 0; done < cycles && !atomic_load(&stop); done++) {
		if (set_memory(0) < 0 || set_memory(1) < 0) {
			report_error("config write");
			break;
		}
	}
	atomic_store(&stop, 1);
	for (unsigned i = 0; i < threads; i++)
		pthread_join(workers[i], NULL);

out:;
	int status = vdev_failures || done != cycles || atomic_load(&stray) ? 1 : 0;
	report("\"kind\":\"race.done\",\"status\":%d,\"cycles\":%u,\"threads\":%u,\"maps\":%llu,\"bar_sigbus\":%llu,"
	       "\"anon_checks\":%llu,\"anon_taken\":%llu,\"stray\":%llu",
	       status, done, threads, (unsigned long long)atomic_load(&maps), (unsigned long long)atomic_load(&bar_sigbus),
	       (unsigned long long)atomic_load(&anon_checks), (unsigned long long)atomic_load(&anon_taken),
	       (unsigned long long)atomic_load(&stray));
	return status;
}
