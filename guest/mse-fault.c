/*
 * mse-fault: the concurrent-fault experiment on vfio-pci's memory-enable
 * (COMMAND.MEM) handling, run in a guest against vdev's membar device.
 *
 *   mse-fault [-m guest|server|combined] [-t THREADS] [-c CYCLES] [-p PERIOD_MS]
 *             [-d SECONDS] [-l LATENCY_CYCLES] [-s STORM_CYCLES] [-P STORM_PROCS]
 *             [-R] [-F] [-u] [-D] [-H] [-C] [ADDR]
 *
 * Without ADDR the first 1b36:0f01 function is used; it is bound to vfio-pci
 * (driver_override) and opened through its IOMMU group.  BAR0 (RAM in the
 * device) is mapped through the device fd at the offset
 * VFIO_DEVICE_GET_REGION_INFO reports, aligned to its size (up to 1 GiB) so
 * that kernels with huge-page BAR faults (6.12+) can use them; -u maps it one
 * page off that alignment instead, which leaves them 4 KiB faults.
 *
 * THREADS workers (default 4) walk BAR0's pages and stamp each one, at a
 * place of their own (8 bytes at page + 8 * thread), with one 8-byte store:
 *   bits 63..56 0x5a | 55..44 thread | 43..20 epoch | 19..0 page
 * A single store, so that a SIGBUS between two halves cannot leave a torn
 * stamp.  A SIGBUS (sigaction SA_SIGINFO|SA_NODEFER; the handler
 * siglongjmps to the access, which each thread arms with sigsetjmp) is
 * recorded with its address and epoch; the worker then retries the page.
 *
 * Epochs.  Every change of MEM starts a new epoch (epoch 0 is the start,
 * MEM on).  Before each flip the program writes the number of the epoch the
 * flip starts to membar's BAR2 register 0x00 (pwrite on the device fd: BAR2
 * is trapped), so the server's ordered event log says which epoch each
 * COMMAND change belongs to.  A doorbell before an enabling flip cannot get
 * through (vfio-pci answers EIO while MEM is off: the trapped-BAR EIO
 * check), so the program rings it again right after enabling; a last one
 * after the final epoch closes it.  The epoch the workers see turns to a
 * disabled one before the disabling config write (the kernel zaps inside
 * it) and back to an enabled one only after the enabling write returned.
 * Two checks follow, each a kernel bug if it fires:
 *   - a SIGBUS is blamed on the latest disabled epoch between the start of
 *     the access and the handler (the kernel decided somewhere in between);
 *     with none, MEM was on all along: "sigbus_unexplained";
 *   - a store that succeeds while its disabled epoch's config write had
 *     returned, both before and after the store, and the enabling write had
 *     not started: "stored_while_disabled".
 *
 * Modes:
 *   guest   (default) a toggler thread flips MEM through the vfio config
 *           region (pwrite at its offset + 4), spending PERIOD_MS (20) in
 *           each epoch, CYCLES (8) times off and on.  Before that, a
 *           VFIO_DEVICE_RESET while the workers fault (unless -R); after
 *           it, LATENCY_CYCLES (6) quiet off/on cycles timing the first
 *           touch and a walk of every page, the fork case (unless -F), and
 *           STORM_CYCLES (0) enables under load with THREADS threads in this
 *           process and in each of STORM_PROCS (2) children released
 *           together after each enable (see storm_phase).
 *           After the toggles, still under load: D3hot and back to D0
 *           through PMCSR (unless -D, see d3hot_phase) and a hot reset
 *           where the topology allows one (unless -H, hot_reset_phase).
 *           Last of all, closing the device fd, group and container while
 *           MEM is off and BAR0 is mapped, then unmapping and opening it
 *           again (unless -C, see close_phase).
 *   combined  both: the device's server flips MEM on its own schedule while
 *           a guest thread flips it every PERIOD_MS for SECONDS, the workers
 *           stamp and a reader makes trapped reads (see combined_phase).
 *   server  the device's server flips MEM (the test drives it); a watcher
 *           polls COMMAND through the config region for SECONDS (3) and
 *           starts an epoch, with its doorbell, when MEM changes.
 *
 * Output, one line each (numbers are JSON integers, times in ns):
 *   VDEV {"kind":"mse.bound","addr":...,"driver":...}
 *   VDEV {"kind":"mse.device","addr":...,"group":N,"bar0_size":N,"bar0_offset":N,"pages":N,
 *         "bar2_offset":N,"config_offset":N,"command":N,"map_alignment":N,"mode":...,"threads":N}
 *   VDEV {"kind":"mse.ready","mode":"server","seconds":N}      (server mode: the watcher starts)
 *   VDEV {"kind":"mse.epoch","epoch":N,"state":"enabled|disabled|reset","phase":...,"start_ns":N,"ns":N,
 *         "flip_ns":N,"first_touch_ns":N|null,"sigbus":N,"sigbus_unexplained":N,"sigbus_offsets":[...],
 *         "stamps":N,"stored_while_disabled":N,"bar0_pread":"ok|EIO|...","doorbell":"ok|EIO|..."}
 *     (sigbus_offsets: the first few faulting offsets in BAR0; bar0_pread: a pread of BAR0 right
 *     after a disabling flip; doorbell: the one rung before the flip that ended the epoch, in server
 *     mode right after the guest saw that flip)
 *   VDEV {"kind":"mse.latency","cycle":N,"epoch":N,"first_touch_ns":N,"walk_ns":N,"walk_mapped_ns":N,"pages":N,
 *         "faults_first_touch":N,"faults_walk":N,"faults_walk_again":N}
 *     (faults_*: the main thread's minor faults over the first touch of page 0, the walk of the other pages,
 *     and a second walk; -1 if getrusage failed)
 *   VDEV {"kind":"mse.eio","bar0_pread_disabled":{"EIO":N,...},"bar2_pwrite_disabled":{...},"bar0_pread_enabled":"ok"}
 *   VDEV {"kind":"mse.reset","result":"ok|errno name","ns":N,"max_stall_ns":N,"sigbus":N,"stamps":N,"command":N}
 *   VDEV {"kind":"mse.fork","forked":"mapped|zapped","inherited_before":"ok","fresh_before":"ok",
 *         "inherited_disabled":"sigbus","inherited_value":N,"fresh_disabled":"sigbus","pread_disabled":"EIO",
 *         "inherited_after":"ok","fresh_after":"ok","sigbus":N,"status":N}   (one per child, see fork_phase)
 *   VDEV {"kind":"mse.storm.progress","cycles":N,"sigbus":N,"ns":N}      (every 100 storm cycles)
 *   VDEV {"kind":"mse.storm","epoch":N,"cycles":N,"requested":N,"threads":N,"processes":N,"touchers":N,
 *         "touches":N,"sigbus":N,"faults":N,"faults_per_cycle_min":N,"faults_per_cycle_max":N,"remaps":N,
 *         "splits":N,"children_ok":true|false,"ns":N}
 *   VDEV {"kind":"mse.d3hot","epoch":N,"pm":N,"to_d3":"ok|errno","state_d3":N,"to_d3_ns":N,"pread_d3":"EIO|...",
 *         "doorbell_d3":"EIO|...","to_d0":"ok|errno","state_d0":N,"to_d0_ns":N,"doorbell_d0":"ok|...","command":N}
 *     (epoch: the d3hot epoch, whose SIGBUS and stores are in its mse.epoch line; state_*: PMCSR read back)
 *   VDEV {"kind":"mse.hot_reset","info":"ok|ENODEV|...","info_errno":N,"devices":N,"flags":N,
 *         "result":"ok|errno|not tried","errno":N,"attempts":N,"epoch":N,"ns":N,"command":N}
 *     (attempts: ioctls made, EBUSY being retried; command: COMMAND read back after the reset, -1: none ran)
 *   VDEV {"kind":"mse.close.step","step":...,"result":...,"ns":N}    (one per step as it finishes)
 *   VDEV {"kind":"mse.close","mem_off":"ok","touch_disabled":"sigbus","close_device":"ok",...,
 *         "munmap":"ok","child_exit":"ok|status N|signal N","reopen":"ok","map":"ok",
 *         "stamp_reopened":"match|mismatch|sigbus"}
 *   VDEV {"kind":"mse.combined","guest_flips":N,"reads_ok":N,"reads_aborted":N,"reads_eio":N,"reads_other":N,
 *         "reads_ok_while_disabled":N}      (combined mode: trapped reads of BAR2 0x28 by outcome)
 *   VDEV {"kind":"mse.stamps","thread":N,"stores":N,"sigbus":N,"stamped":N,"hash":N}
 *   VDEV {"kind":"mse.readback","mismatches":N,"checked":N}
 *   VDEV {"kind":"mse.done","status":N,"mode":...,"epochs":N,"sigbus":N,"sigbus_enabled":N,
 *         "stored_while_disabled":N,"closing_doorbell":"ok","failed":[...]}
 * mse.stamps's hash is FNV-1a 64 over the thread's last successful stamp
 * of every page (0 where it never stamped), as little-endian 8-byte words
 * in page order: the server computes the same over BAR0 to check that
 * every stamp arrived.  Exit status 0 when every step worked and every
 * check the mode expects held.
 */
#define _GNU_SOURCE
#define VDEV_PROGRAM "mse"
#include "vfio-common.h"

#include <linux/pci_regs.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>

#define PAGE 4096
#define MEMBAR_VENDOR 0x1b36
#define MEMBAR_DEVICE 0x0f01
#define MAX_THREADS 64
#define MAX_EPOCHS 1024
#define OFFSETS_KEPT 4
#define STAMP_MAGIC UINT64_C(0x5a)
#define FNV_OFFSET UINT64_C(0xcbf29ce484222325)
#define FNV_PRIME UINT64_C(0x100000001b3)

enum state { ENABLED, DISABLED, RESET, STORM, D3HOT };
static const char *const state_names[] = {"enabled", "disabled", "reset", "storm", "d3hot"};

/* Epochs in which no BAR0 access may succeed: MEM off, or the device in D3hot (vfio-pci zaps for both). */
static int blocking(enum state state)
{
	return state == DISABLED || state == D3HOT;
}

struct epoch {
	enum state state;
	const char *phase;
	int64_t started;
	int64_t flip_ns;
	int64_t first_touch_ns; /* -1: not measured */
	int bar0_pread;		/* 0 ok, else errno; -1 not tried */
	int doorbell;		/* the doorbell rung before the flip that ended this epoch */
};

/* What one thread saw; only that thread (and its SIGBUS handler) writes it. */
struct thread_log {
	int id;
	uint64_t *last; /* the last stamp that reached each page */
	uint32_t stamps[MAX_EPOCHS];
	uint32_t sigbus[MAX_EPOCHS];	/* by the disabled epoch that explains them, see on_sigbus */
	uint32_t unexplained[MAX_EPOCHS]; /* SIGBUS with no disabled epoch since the access began */
	uint32_t stored_while_disabled[MAX_EPOCHS];
	uint64_t offsets[MAX_EPOCHS][OFFSETS_KEPT];
	uint8_t offsets_kept[MAX_EPOCHS];
	uint64_t stores;
	int64_t max_stall_ns;
};

static struct vfio_dev dev;
static struct vfio_region_info config_region, bar0_region, bar2_region;
static uint8_t *bar0;
static size_t pages;
static uint16_t command;

static struct epoch epochs[MAX_EPOCHS];
static _Atomic uint32_t current_epoch;	/* the epoch the workers see, see the top comment */
/*
 * The disabled epoch whose config write has returned, until the enabling
 * write starts (then ENABLING): a store that succeeds while it names the
 * store's own epoch, read before and after the store, succeeded with MEM off.
 */
static _Atomic uint32_t settled_epoch;
#define ENABLING UINT32_MAX
static _Atomic int workers_stop;
static _Atomic int timing_stores;	/* workers time each store (the reset phase) */
static int64_t program_start;

static struct thread_log *logs[2 * MAX_THREADS + 2]; /* workers, main thread, a fork child, storm touchers */
static unsigned num_logs;

static __thread sigjmp_buf *tl_jump;
static __thread const uint8_t *tl_base;
static __thread uint32_t tl_access_epoch;
static __thread struct thread_log *tl_log;

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void sleep_ms(unsigned ms)
{
	struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000};
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

static const char *errno_name(int error)
{
	switch (error) {
	case 0: return "ok";
	case EIO: return "EIO";
	case EINVAL: return "EINVAL";
	case EBUSY: return "EBUSY";
	case EAGAIN: return "EAGAIN";
	case ENOTTY: return "ENOTTY";
	case EFAULT: return "EFAULT";
	case ENODEV: return "ENODEV";
	case ENOSPC: return "ENOSPC";
	case EPERM: return "EPERM";
	case EBADF: return "EBADF";
	case ENOENT: return "ENOENT";
	default: return "other";
	}
}

/* -- guarded BAR0 accesses ------------------------------------------------------- */

/*
 * SA_NODEFER keeps SIGBUS unblocked inside the handler, so jumping out of
 * it leaves the signal mask as it was: sigsetjmp need not save the mask,
 * which would cost a system call on every access.
 */
static void on_sigbus(int sig, siginfo_t *info, void *context)
{
	(void)context;
	struct thread_log *log = tl_log;
	if (!tl_jump || !log) {
		/* Not one of our accesses: die of it as if there were no handler. */
		signal(sig, SIG_DFL);
		return;
	}
	/*
	 * The kernel decided on SIGBUS somewhere between the start of the
	 * access and now (a vCPU may be descheduled in between), so blame the
	 * latest disabled epoch in that interval; none means MEM was on all
	 * along, which vfio-pci must never answer with SIGBUS.
	 */
	uint32_t e = atomic_load(&current_epoch);
	while (e > tl_access_epoch && !blocking(epochs[e].state))
		e--;
	if (!blocking(epochs[e].state))
		log->unexplained[e]++;
	log->sigbus[e]++;
	if (log->offsets_kept[e] < OFFSETS_KEPT)
		log->offsets[e][log->offsets_kept[e]++] = (uint64_t)((const uint8_t *)info->si_addr - tl_base);
	siglongjmp(*tl_jump, 1);
}

/* Load (store = 0) or store 8 bytes at base + offset; -1 if it raised SIGBUS. */
static int guarded(uint8_t *base, size_t offset, uint64_t *value, int store)
{
	sigjmp_buf here;
	if (sigsetjmp(here, 0)) {
		tl_jump = NULL;
		return -1;
	}
	tl_base = base;
	tl_access_epoch = atomic_load(&current_epoch);
	tl_jump = &here;
	volatile uint64_t *slot = (volatile uint64_t *)(base + offset);
	if (store)
		*slot = *value;
	else
		*value = *slot;
	tl_jump = NULL;
	return 0;
}

static struct thread_log *new_log(int id)
{
	struct thread_log *log = calloc(1, sizeof(*log));
	log->id = id;
	log->last = calloc(pages, sizeof(uint64_t));
	logs[num_logs++] = log;
	return log;
}

/* -- the device -------------------------------------------------------------------- */

/* Set (on) or clear COMMAND.MEM through vfio's config region; 0 or the errno of the write. */
static int set_memory(int on)
{
	uint16_t value = on ? (command | PCI_COMMAND_MEMORY) : (command & ~PCI_COMMAND_MEMORY);
	ssize_t n = pwrite(dev.fd, &value, sizeof(value), config_region.offset + PCI_COMMAND);
	if (n != (ssize_t)sizeof(value))
		return n < 0 ? errno : EIO;
	command = value;
	return 0;
}

static int read_command(uint16_t *value)
{
	return pread(dev.fd, value, sizeof(*value), config_region.offset + PCI_COMMAND) == sizeof(*value) ? 0 : -1;
}

/* Ring membar's epoch doorbell (BAR2 0x00); 0 or the errno vfio-pci answered. */
static int doorbell(uint32_t value)
{
	uint64_t wide = value;
	ssize_t n = pwrite(dev.fd, &wide, sizeof(wide), bar2_region.offset);
	return n == (ssize_t)sizeof(wide) ? 0 : (n < 0 ? errno : EIO);
}

static int pread_bar0(void)
{
	uint64_t value;
	ssize_t n = pread(dev.fd, &value, sizeof(value), bar0_region.offset);
	return n == (ssize_t)sizeof(value) ? 0 : (n < 0 ? errno : EIO);
}

/* Open epoch e; the workers see it once current_epoch says so. */
static void begin_epoch(uint32_t e, enum state state, const char *phase)
{
	epochs[e] = (struct epoch){
		.state = state, .phase = phase, .started = now_ns(), .first_touch_ns = -1, .bar0_pread = -1, .doorbell = -1};
}

static uint32_t next_epoch(void)
{
	uint32_t e = atomic_load(&current_epoch) + 1;
	if (e >= MAX_EPOCHS) {
		fprintf(stderr, "mse-fault: more than %d epochs\n", MAX_EPOCHS);
		exit(2);
	}
	return e;
}

/* MEM off: doorbell (MEM still on), label, config write (the kernel zaps), then the EIO check. */
static void flip_off(const char *phase)
{
	uint32_t e = next_epoch();
	epochs[e - 1].doorbell = doorbell(e);
	begin_epoch(e, DISABLED, phase);
	atomic_store(&current_epoch, e);
	int64_t t0 = now_ns();
	int error = set_memory(0);
	epochs[e].flip_ns = now_ns() - t0;
	if (error) {
		errno = error;
		report_error("config write MEM off");
	}
	atomic_store(&settled_epoch, e);
	epochs[e].bar0_pread = pread_bar0();
}

/*
 * MEM on: the doorbell fails (MEM off), config write, label, first touch
 * of page 0 (unless !touch, which leaves BAR0 unmapped), doorbell again.
 */
static void flip_on(const char *phase, int touch)
{
	uint32_t e = next_epoch();
	epochs[e - 1].doorbell = doorbell(e);
	atomic_store(&settled_epoch, ENABLING);
	int64_t t0 = now_ns();
	int error = set_memory(1);
	int64_t t1 = now_ns();
	if (error) {
		errno = error;
		report_error("config write MEM on");
	}
	begin_epoch(e, ENABLED, phase);
	epochs[e].flip_ns = t1 - t0;
	atomic_store(&current_epoch, e);
	atomic_store(&settled_epoch, e);
	uint64_t value;
	int64_t t2 = now_ns();
	if (touch && guarded(bar0, 0, &value, 0) == 0)
		epochs[e].first_touch_ns = now_ns() - t2;
	error = doorbell(e);
	if (error) {
		errno = error;
		report_error("doorbell after MEM on");
	}
}

/* -- workers ----------------------------------------------------------------------- */

static uint64_t stamp_of(int thread, uint32_t epoch, size_t page)
{
	return STAMP_MAGIC << 56 | (uint64_t)(thread & 0xfff) << 44 | (uint64_t)(epoch & 0xffffff) << 20 |
	       (page & 0xfffff);
}

static void *worker(void *arg)
{
	struct thread_log *log = arg;
	tl_log = log;
	size_t page = 0;
	while (!atomic_load_explicit(&workers_stop, memory_order_relaxed)) {
		uint32_t e = atomic_load(&current_epoch);
		uint32_t settled_before = atomic_load(&settled_epoch);
		uint64_t stamp = stamp_of(log->id, e, page);
		int timed = atomic_load_explicit(&timing_stores, memory_order_relaxed);
		int64_t t0 = timed ? now_ns() : 0;
		if (guarded(bar0, page * PAGE + (size_t)log->id * 8, &stamp, 1) < 0) {
			/* Let the toggler run: on a 2-vCPU guest a tight SIGBUS loop starves it. */
			sched_yield();
			continue;
		}
		int64_t took = timed ? now_ns() - t0 : 0;
		if (took > log->max_stall_ns)
			log->max_stall_ns = took;
		log->stores++;
		log->last[page] = stamp;
		log->stamps[e]++;
		if (blocking(epochs[e].state) && settled_before == e && atomic_load(&settled_epoch) == e)
			log->stored_while_disabled[e]++;
		page = (page + 1) % pages;
	}
	return NULL;
}

static pthread_t threads[MAX_THREADS];

static void start_workers(unsigned count)
{
	atomic_store(&workers_stop, 0);
	for (unsigned i = 0; i < count; i++) {
		errno = pthread_create(&threads[i], NULL, worker, new_log((int)i));
		if (errno) {
			report_error("pthread_create");
			exit(1);
		}
	}
}

static void stop_workers(unsigned count)
{
	atomic_store(&workers_stop, 1);
	for (unsigned i = 0; i < count; i++)
		pthread_join(threads[i], NULL);
}

/* -- phases ------------------------------------------------------------------------ */

/* VFIO_DEVICE_RESET while the workers fault: the kernel zaps and holds its memory lock, so they stall. */
static void reset_phase(unsigned period_ms)
{
	sleep_ms(period_ms);
	uint32_t r = next_epoch();
	epochs[r - 1].doorbell = doorbell(r);
	begin_epoch(r, RESET, "reset");
	atomic_store(&timing_stores, 1);
	atomic_store(&current_epoch, r);
	atomic_store(&settled_epoch, r);
	int64_t t0 = now_ns();
	int result = ioctl(dev.fd, VFIO_DEVICE_RESET) < 0 ? errno : 0;
	int64_t took = now_ns() - t0;
	epochs[r].flip_ns = took;
	sleep_ms(period_ms);
	atomic_store(&timing_stores, 0);
	uint16_t after = 0;
	if (read_command(&after) < 0)
		report_error("read COMMAND after reset");

	uint32_t e = next_epoch();
	begin_epoch(e, ENABLED, "reset");
	atomic_store(&current_epoch, e);
	atomic_store(&settled_epoch, e);
	epochs[r].doorbell = doorbell(e);

	int64_t stall = 0;
	uint64_t sigbus = 0, stamps = 0;
	for (unsigned i = 0; i < num_logs; i++) {
		stall = logs[i]->max_stall_ns > stall ? logs[i]->max_stall_ns : stall;
		sigbus += logs[i]->sigbus[r];
		stamps += logs[i]->stamps[r];
	}
	report("\"kind\":\"mse.reset\",\"epoch\":%u,\"result\":\"%s\",\"errno\":%d,\"ns\":%lld,\"max_stall_ns\":%lld,"
	       "\"sigbus\":%llu,\"stamps\":%llu,\"command\":%u",
	       r, errno_name(result), result, (long long)took, (long long)stall, (unsigned long long)sigbus,
	       (unsigned long long)stamps, after);
	if (result) {
		errno = result;
		report_error("VFIO_DEVICE_RESET");
	}
}

static void toggle_phase(unsigned cycles, unsigned period_ms)
{
	for (unsigned i = 0; i < cycles; i++) {
		sleep_ms(period_ms);
		flip_off("toggle");
		sleep_ms(period_ms);
		flip_on("toggle", 1);
	}
	sleep_ms(period_ms);
}

/* -- the other zap paths: D3hot, hot reset ------------------------------------------ */

/* Where capability `id` sits in config space, walked through vfio's config region; 0 if it is not there. */
static unsigned find_capability(uint8_t id)
{
	uint8_t at = 0;
	if (pread(dev.fd, &at, 1, config_region.offset + PCI_CAPABILITY_LIST) != 1)
		return 0;
	for (int hops = 0; at >= 0x40 && hops < 48; hops++) {
		uint8_t header[2];
		if (pread(dev.fd, header, sizeof(header), config_region.offset + at) != sizeof(header))
			return 0;
		if (header[0] == id)
			return at;
		at = header[1] & ~3u;
	}
	return 0;
}

/* The power state bits of PMCSR, or -1 if the read failed. */
static int power_state(unsigned pm)
{
	uint16_t pmcsr;
	if (pread(dev.fd, &pmcsr, sizeof(pmcsr), config_region.offset + pm + PCI_PM_CTRL) != sizeof(pmcsr))
		return -1;
	return pmcsr & PCI_PM_CTRL_STATE_MASK;
}

/* Write the power state into PMCSR through vfio's config region; 0 or the errno. */
static int set_power_state(unsigned pm, unsigned state)
{
	uint16_t pmcsr;
	off_t at = config_region.offset + pm + PCI_PM_CTRL;
	if (pread(dev.fd, &pmcsr, sizeof(pmcsr), at) != sizeof(pmcsr))
		return errno ? errno : EIO;
	pmcsr = (pmcsr & ~PCI_PM_CTRL_STATE_MASK) | state;
	ssize_t n = pwrite(dev.fd, &pmcsr, sizeof(pmcsr), at);
	return n == (ssize_t)sizeof(pmcsr) ? 0 : (n < 0 ? errno : EIO);
}

/*
 * D3hot through PMCSR while the workers fault, MEM staying on.  vfio-pci
 * zaps the BAR mappings before it moves the device to D3hot
 * (vfio_pm_config_write -> vfio_lock_and_set_power_state) and counts a
 * device in D3hot as memory-disabled (__vfio_pci_memory_enabled), so the
 * epoch is a blocking one like a MEM-off epoch: no store may succeed in it,
 * and a pread of BAR0 and the doorbell must fail.  Back in D0 the workers
 * run one more period.  0 when both transitions took.
 */
static int d3hot_phase(unsigned period_ms)
{
	unsigned pm = find_capability(PCI_CAP_ID_PM);
	if (!pm) {
		errno = ENOENT;
		report_error("find the Power Management capability");
		return 1;
	}
	sleep_ms(period_ms);
	uint32_t d = next_epoch();
	epochs[d - 1].doorbell = doorbell(d);
	begin_epoch(d, D3HOT, "d3hot");
	atomic_store(&current_epoch, d);
	int64_t t0 = now_ns();
	int to_d3 = set_power_state(pm, 3);
	epochs[d].flip_ns = now_ns() - t0;
	atomic_store(&settled_epoch, d);
	int in_d3 = power_state(pm);
	epochs[d].bar0_pread = pread_bar0();
	sleep_ms(period_ms);

	uint32_t e = next_epoch();
	epochs[d].doorbell = doorbell(e);
	atomic_store(&settled_epoch, ENABLING);
	t0 = now_ns();
	int to_d0 = set_power_state(pm, 0);
	int64_t d0_ns = now_ns() - t0;
	begin_epoch(e, ENABLED, "d3hot");
	epochs[e].flip_ns = d0_ns;
	atomic_store(&current_epoch, e);
	atomic_store(&settled_epoch, e);
	int in_d0 = power_state(pm);
	uint64_t value;
	t0 = now_ns();
	if (guarded(bar0, 0, &value, 0) == 0)
		epochs[e].first_touch_ns = now_ns() - t0;
	int bell = doorbell(e);
	uint16_t after = 0;
	read_command(&after);
	sleep_ms(period_ms);
	report("\"kind\":\"mse.d3hot\",\"epoch\":%u,\"pm\":%u,\"to_d3\":\"%s\",\"state_d3\":%d,\"to_d3_ns\":%lld,"
	       "\"pread_d3\":\"%s\",\"doorbell_d3\":\"%s\",\"to_d0\":\"%s\",\"state_d0\":%d,\"to_d0_ns\":%lld,"
	       "\"doorbell_d0\":\"%s\",\"command\":%u",
	       d, pm, errno_name(to_d3), in_d3, (long long)epochs[d].flip_ns, errno_name(epochs[d].bar0_pread),
	       errno_name(epochs[d].doorbell), errno_name(to_d0), in_d0, (long long)d0_ns, errno_name(bell), after);
	return to_d3 || to_d0 || in_d3 != 3 || in_d0 != 0;
}

/*
 * VFIO_DEVICE_PCI_HOT_RESET while the workers fault, where the topology
 * allows one: VFIO_DEVICE_GET_PCI_HOT_RESET_INFO first says whether a slot
 * or bus reset is possible for the device and which devices it would
 * take along.  A device on the root bus has no bridge above it to reset
 * its bus with, so the kernel answers ENODEV there (vfio_pci_core.c:
 * pci_probe_reset_slot and pci_probe_reset_bus both refuse); the report
 * says so and the reset is not attempted.  When it is, the epoch is a
 * reset epoch like reset_phase's.
 */
enum { HOT_RESET_ATTEMPTS = 1000 };

static void hot_reset_phase(unsigned period_ms)
{
	enum { MOST = 8 };
	size_t info_size = sizeof(struct vfio_pci_hot_reset_info) + MOST * sizeof(struct vfio_pci_dependent_device);
	struct vfio_pci_hot_reset_info *info = calloc(1, info_size);
	info->argsz = info_size;
	int info_result = ioctl(dev.fd, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, info) < 0 ? errno : 0;
	int result = -1;
	unsigned attempts = 0;
	uint32_t r = 0;
	int64_t took = 0;
	if (!info_result) {
		size_t reset_size = sizeof(struct vfio_pci_hot_reset) + sizeof(int32_t);
		struct vfio_pci_hot_reset *reset = calloc(1, reset_size);
		reset->argsz = reset_size;
		reset->count = 1;
		reset->group_fds[0] = dev.group;
		sleep_ms(period_ms);
		r = next_epoch();
		epochs[r - 1].doorbell = doorbell(r);
		begin_epoch(r, RESET, "hot_reset");
		atomic_store(&current_epoch, r);
		atomic_store(&settled_epoch, r);
		int64_t t0 = now_ns();
		/* vfio-pci only trylocks the vma and memory locks of every device it resets, and answers EBUSY
		 * when a faulting thread holds one (vfio_pci_dev_set_hot_reset): retry, as a VMM would. */
		for (;;) {
			attempts++;
			result = ioctl(dev.fd, VFIO_DEVICE_PCI_HOT_RESET, reset) < 0 ? errno : 0;
			if (result != EBUSY || attempts == HOT_RESET_ATTEMPTS)
				break;
			sleep_ms(1);
		}
		took = now_ns() - t0;
		epochs[r].flip_ns = took;
		sleep_ms(period_ms);
		uint32_t e = next_epoch();
		begin_epoch(e, ENABLED, "hot_reset");
		atomic_store(&current_epoch, e);
		atomic_store(&settled_epoch, e);
		epochs[r].doorbell = doorbell(e);
		free(reset);
	}
	/* COMMAND as the kernel restored it after the bus reset (-1: not read). */
	uint16_t after = 0;
	int after_ok = result >= 0 && read_command(&after) == 0;
	report("\"kind\":\"mse.hot_reset\",\"info\":\"%s\",\"info_errno\":%d,\"devices\":%u,\"flags\":%u,"
	       "\"result\":\"%s\",\"errno\":%d,\"attempts\":%u,\"epoch\":%u,\"ns\":%lld,\"command\":%d",
	       errno_name(info_result), info_result, info_result ? 0 : info->count, info_result ? 0 : info->flags,
	       result < 0 ? "not tried" : errno_name(result), result < 0 ? 0 : result, attempts, r, (long long)took,
	       after_ok ? (int)after : -1);
	free(info);
}

/* -- counting faults and present pages ------------------------------------------------ */

/* This thread's minor faults so far: a vfio-pci BAR fault is one (it never does I/O). */
static long minor_faults(void)
{
	struct rusage usage;
	return getrusage(RUSAGE_THREAD, &usage) == 0 ? usage.ru_minflt : -1;
}

/*
 * Quiet off/on cycles (no workers).  After each enable: the first touch of
 * page 0 with its cost in time and in faults, then a walk of every other
 * page and a second walk, each with its fault count.  The number of faults
 * an enable costs tells the kernels' fault paths apart: one per vma (the
 * whole mapping on the first fault), one per huge page, one per 4 KiB page,
 * or none when the kernel mapped BAR0 before the first touch.  Counting is
 * the only way to see which pages were present: /proc/self/pagemap and
 * mincore() both pass over VM_PFNMAP mappings as holes (walk_page_test()
 * in mm/pagewalk.c), so they report nothing for a BAR.
 */
static void latency_phase(unsigned cycles)
{
	for (unsigned i = 0; i < cycles; i++) {
		flip_off("latency");
		sleep_ms(5);
		flip_on("latency", 0);
		uint32_t e = atomic_load(&current_epoch);
		uint64_t value;
		long f0 = minor_faults();
		int64_t t0 = now_ns();
		if (guarded(bar0, 0, &value, 0) == 0)
			epochs[e].first_touch_ns = now_ns() - t0;
		long f1 = minor_faults();
		int64_t t1 = now_ns();
		for (size_t page = 1; page < pages; page++)
			guarded(bar0, page * PAGE, &value, 0);
		int64_t t2 = now_ns();
		long f2 = minor_faults();
		for (size_t page = 1; page < pages; page++)
			guarded(bar0, page * PAGE, &value, 0);
		int64_t t3 = now_ns();
		long f3 = minor_faults();
		report("\"kind\":\"mse.latency\",\"cycle\":%u,\"epoch\":%u,\"first_touch_ns\":%lld,\"walk_ns\":%lld,"
		       "\"walk_mapped_ns\":%lld,\"pages\":%zu,\"faults_first_touch\":%ld,\"faults_walk\":%ld,"
		       "\"faults_walk_again\":%ld",
		       i, e, (long long)epochs[e].first_touch_ns, (long long)(t2 - t1), (long long)(t3 - t2), pages - 1,
		       f1 - f0, f2 - f1, f3 - f2);
	}
}

/*
 * The fork case.  A child inherits BAR0's mapping and also maps it afresh
 * through the inherited device fd; both must raise SIGBUS once the parent
 * cleared MEM, and work again once it set it.  Two children tell apart how
 * the kernel tracks the inherited mapping: one is forked while the parent's
 * page-table entries for BAR0 are present (fork copies them, as it does for
 * every VM_PFNMAP mapping), the other right after a MEM off/on cycle, before
 * anything touched BAR0 again (nothing to copy: the child must fault).
 */
struct fork_outcome {
	int inherited_before, fresh_before, inherited_disabled, fresh_disabled, pread_disabled;
	int inherited_after, fresh_after;
	uint64_t inherited_value; /* what a load through the inherited mapping read while MEM was off */
	uint32_t sigbus;
};

struct child {
	const char *forked; /* "mapped" or "zapped": the parent's BAR0 entries at fork time */
	pid_t pid;
	int down, up;
	struct fork_outcome out;
};

static const char *access_name(int outcome)
{
	return outcome < 0 ? "sigbus" : "ok";
}

static int wait_byte(int fd, char expected)
{
	char got = 0;
	return read(fd, &got, 1) == 1 && got == expected ? 0 : -1;
}

static void fork_child(int from_parent, int to_parent)
{
	struct fork_outcome out = {0};
	struct thread_log *log = new_log(MAX_THREADS);
	tl_log = log;
	uint64_t value;
	uint8_t *fresh = mmap(NULL, bar0_region.size, PROT_READ | PROT_WRITE, MAP_SHARED, dev.fd, bar0_region.offset);
	if (fresh == MAP_FAILED)
		_exit(3);
	out.inherited_before = guarded(bar0, PAGE, &value, 0);
	out.fresh_before = guarded(fresh, PAGE, &value, 0);
	if (write(to_parent, "r", 1) != 1 || wait_byte(from_parent, 'd') < 0)
		_exit(4);
	out.inherited_disabled = guarded(bar0, 2 * PAGE, &out.inherited_value, 0);
	out.fresh_disabled = guarded(fresh, 3 * PAGE, &value, 0);
	out.pread_disabled = pread_bar0();
	if (write(to_parent, "x", 1) != 1 || wait_byte(from_parent, 'e') < 0)
		_exit(5);
	out.inherited_after = guarded(bar0, 2 * PAGE, &value, 0);
	out.fresh_after = guarded(fresh, 3 * PAGE, &value, 0);
	for (unsigned e = 0; e < MAX_EPOCHS; e++)
		out.sigbus += log->sigbus[e];
	_exit(write(to_parent, &out, sizeof(out)) == sizeof(out) ? 0 : 6);
}

static int start_child(struct child *child)
{
	int down[2], up[2];
	if (pipe(down) < 0 || pipe(up) < 0) {
		report_error("pipe");
		return -1;
	}
	child->pid = fork();
	if (child->pid < 0) {
		report_error("fork");
		return -1;
	}
	if (child->pid == 0) {
		close(down[1]);
		close(up[0]);
		fork_child(down[0], up[1]);
	}
	close(down[0]);
	close(up[1]);
	child->down = down[1];
	child->up = up[0];
	memset(&child->out, 0xff, sizeof(child->out));
	return 0;
}

/* 0 when both children saw what vfio-pci promises, 1 when one did not, -1 when the case could not run. */
static int fork_phase(void)
{
	struct child children[2] = {{.forked = "mapped"}, {.forked = "zapped"}};
	uint64_t value;
	guarded(bar0, 0, &value, 0);
	if (start_child(&children[0]) < 0)
		return -1;
	int ok = wait_byte(children[0].up, 'r') == 0;
	flip_off("fork");
	flip_on("fork", 0);
	if (start_child(&children[1]) < 0)
		return -1;
	ok = ok && wait_byte(children[1].up, 'r') == 0;
	flip_off("fork");
	for (int i = 0; i < 2; i++)
		ok = ok && write(children[i].down, "d", 1) == 1 && wait_byte(children[i].up, 'x') == 0;
	flip_on("fork", 1);
	int expected = 1;
	for (int i = 0; i < 2; i++) {
		struct child *child = &children[i];
		struct fork_outcome *out = &child->out;
		ok = ok && write(child->down, "e", 1) == 1 && read(child->up, out, sizeof(*out)) == sizeof(*out);
		int status = 0;
		waitpid(child->pid, &status, 0);
		close(child->down);
		close(child->up);
		status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
		report("\"kind\":\"mse.fork\",\"forked\":\"%s\",\"inherited_before\":\"%s\",\"fresh_before\":\"%s\","
		       "\"inherited_disabled\":\"%s\",\"inherited_value\":%llu,\"fresh_disabled\":\"%s\","
		       "\"pread_disabled\":\"%s\",\"inherited_after\":\"%s\",\"fresh_after\":\"%s\",\"sigbus\":%u,"
		       "\"status\":%d",
		       child->forked, access_name(out->inherited_before), access_name(out->fresh_before),
		       access_name(out->inherited_disabled), (unsigned long long)out->inherited_value,
		       access_name(out->fresh_disabled), errno_name(out->pread_disabled),
		       access_name(out->inherited_after), access_name(out->fresh_after), out->sigbus, status);
		ok = ok && status == 0;
		expected = expected && out->inherited_before == 0 && out->fresh_before == 0 &&
			   out->inherited_disabled < 0 && out->fresh_disabled < 0 && out->pread_disabled == EIO &&
			   out->inherited_after == 0 && out->fresh_after == 0;
	}
	if (!ok) {
		errno = ECHILD;
		report_error("fork children");
		return -1;
	}
	return expected ? 0 : 1;
}

/* Server mode: the device flips MEM; start an epoch whenever COMMAND says it changed. */
static void watch_phase(unsigned seconds)
{
	int64_t deadline = now_ns() + (int64_t)seconds * 1000000000;
	int on = 1;
	while (now_ns() < deadline) {
		uint16_t value;
		if (read_command(&value) < 0) {
			report_error("read COMMAND");
			return;
		}
		int now_on = !!(value & PCI_COMMAND_MEMORY);
		if (now_on != on) {
			uint32_t e = next_epoch();
			begin_epoch(e, now_on ? ENABLED : DISABLED, "server");
			atomic_store(&current_epoch, e);
			atomic_store(&settled_epoch, e);
			uint64_t probe;
			int64_t t0 = now_ns();
			if (guarded(bar0, 0, &probe, 0) == 0)
				epochs[e].first_touch_ns = now_ns() - t0;
			if (!now_on)
				epochs[e].bar0_pread = pread_bar0();
			epochs[e - 1].doorbell = doorbell(e);
			on = now_on;
		}
		sleep_ms(1);
	}
}

/* -- both sides toggling (combined mode) ---------------------------------------------- */

/* Trapped reads of membar's bar0_size register (BAR2 0x28) while both sides flip MEM, by outcome. */
struct trapped_reads {
	_Atomic uint64_t ok, aborted, eio, other, ok_while_disabled;
	_Atomic int stop;
};

static struct trapped_reads trapped;

/*
 * Reads the low half of bar0_size through vfio's BAR2 region until told to
 * stop: the value when the device decodes, all-ones when the device has
 * MEM off (it master-aborts; the guest kernel is never told), EIO when the
 * guest has MEM off (vfio-pci refuses before the device sees it).  A read
 * that returns the value while the guest's disabling write had returned,
 * before and after the read, counts as ok_while_disabled (see worker()).
 */
static void *trapped_reader(void *arg)
{
	uint32_t expected = (uint32_t)bar0_region.size;
	(void)arg;
	while (!atomic_load(&trapped.stop)) {
		uint32_t e = atomic_load(&current_epoch);
		uint32_t settled_before = atomic_load(&settled_epoch);
		uint32_t value;
		ssize_t n = pread(dev.fd, &value, sizeof(value), bar2_region.offset + 0x28);
		if (n == (ssize_t)sizeof(value) && value == expected) {
			atomic_fetch_add(&trapped.ok, 1);
			if (epochs[e].state == DISABLED && settled_before == e && atomic_load(&settled_epoch) == e)
				atomic_fetch_add(&trapped.ok_while_disabled, 1);
		} else if (n == (ssize_t)sizeof(value) && value == UINT32_MAX) {
			atomic_fetch_add(&trapped.aborted, 1);
		} else if (n < 0 && errno == EIO) {
			atomic_fetch_add(&trapped.eio, 1);
		} else {
			atomic_fetch_add(&trapped.other, 1);
		}
		sched_yield();
	}
	return NULL;
}

/*
 * Combined mode: the device's server flips MEM on its own schedule (the
 * harness starts it at mse.ready) while this program flips it through the
 * config region every PERIOD_MS for SECONDS, the workers stamp BAR0 and a
 * reader makes trapped reads.  The report lets the harness check that no
 * read succeeded while either side had MEM off, and that the reads the
 * guest saw succeed or master-aborted are the ones the server's log shows.
 */
static void combined_phase(unsigned seconds, unsigned period_ms)
{
	pthread_t reader;
	errno = pthread_create(&reader, NULL, trapped_reader, NULL);
	if (errno) {
		report_error("pthread_create");
		return;
	}
	report("\"kind\":\"mse.ready\",\"mode\":\"combined\",\"seconds\":%u", seconds);
	int64_t deadline = now_ns() + (int64_t)seconds * 1000000000;
	unsigned flips = 0;
	while (now_ns() < deadline && atomic_load(&current_epoch) + 4 < MAX_EPOCHS) {
		sleep_ms(period_ms);
		flip_off("combined");
		sleep_ms(period_ms);
		flip_on("combined", 1);
		flips += 2;
	}
	atomic_store(&trapped.stop, 1);
	pthread_join(reader, NULL);
	report("\"kind\":\"mse.combined\",\"guest_flips\":%u,\"reads_ok\":%llu,\"reads_aborted\":%llu,\"reads_eio\":%llu,"
	       "\"reads_other\":%llu,\"reads_ok_while_disabled\":%llu",
	       flips, (unsigned long long)trapped.ok, (unsigned long long)trapped.aborted,
	       (unsigned long long)trapped.eio, (unsigned long long)trapped.other,
	       (unsigned long long)trapped.ok_while_disabled);
}

/* -- reports ------------------------------------------------------------------------ */

struct errno_counts {
	unsigned ok, eio, other;
};

static void count_errno(struct errno_counts *counts, int error)
{
	if (error == 0)
		counts->ok++;
	else if (error == EIO)
		counts->eio++;
	else if (error > 0)
		counts->other++;
}

static uint64_t report_epochs(uint32_t last, uint64_t *sigbus_enabled, uint64_t *stored_disabled,
			      struct errno_counts *pread_disabled, struct errno_counts *doorbell_disabled)
{
	uint64_t sigbus_total = 0;
	for (uint32_t e = 0; e <= last; e++) {
		uint64_t sigbus = 0, unexplained = 0, stamps = 0, stored = 0;
		char offsets[160] = "";
		int kept = 0, len = 0;
		for (unsigned i = 0; i < num_logs; i++) {
			sigbus += logs[i]->sigbus[e];
			unexplained += logs[i]->unexplained[e];
			stamps += logs[i]->stamps[e];
			stored += logs[i]->stored_while_disabled[e];
			for (unsigned k = 0; k < logs[i]->offsets_kept[e] && kept < OFFSETS_KEPT; k++, kept++)
				len += snprintf(offsets + len, sizeof(offsets) - len, "%s%llu", kept ? "," : "",
						(unsigned long long)logs[i]->offsets[e][k]);
		}
		const struct epoch *ep = &epochs[e];
		int64_t ended = e < last ? epochs[e + 1].started : now_ns();
		char touch[24] = "null";
		if (ep->first_touch_ns >= 0)
			snprintf(touch, sizeof(touch), "%lld", (long long)ep->first_touch_ns);
		report("\"kind\":\"mse.epoch\",\"epoch\":%u,\"state\":\"%s\",\"phase\":\"%s\",\"start_ns\":%lld,\"ns\":%lld,"
		       "\"flip_ns\":%lld,\"first_touch_ns\":%s,\"sigbus\":%llu,\"sigbus_unexplained\":%llu,"
		       "\"sigbus_offsets\":[%s],\"stamps\":%llu,\"stored_while_disabled\":%llu,"
		       "\"bar0_pread\":%s%s%s,\"doorbell\":%s%s%s",
		       e, state_names[ep->state], ep->phase, (long long)(ep->started - program_start),
		       (long long)(ended - ep->started), (long long)ep->flip_ns, touch, (unsigned long long)sigbus,
		       (unsigned long long)unexplained, offsets, (unsigned long long)stamps, (unsigned long long)stored,
		       ep->bar0_pread < 0 ? "" : "\"",
		       ep->bar0_pread < 0 ? "null" : errno_name(ep->bar0_pread), ep->bar0_pread < 0 ? "" : "\"",
		       ep->doorbell < 0 ? "" : "\"", ep->doorbell < 0 ? "null" : errno_name(ep->doorbell),
		       ep->doorbell < 0 ? "" : "\"");
		sigbus_total += sigbus;
		*sigbus_enabled += unexplained;
		if (blocking(ep->state))
			*stored_disabled += stored;
		if (ep->state == DISABLED) {
			if (ep->bar0_pread >= 0)
				count_errno(pread_disabled, ep->bar0_pread);
			if (ep->doorbell >= 0)
				count_errno(doorbell_disabled, ep->doorbell);
		}
	}
	return sigbus_total;
}

static void report_stamps(unsigned count)
{
	for (unsigned i = 0; i < count; i++) {
		const struct thread_log *log = logs[i];
		uint64_t hash = FNV_OFFSET, sigbus = 0;
		size_t stamped = 0;
		for (size_t page = 0; page < pages; page++) {
			for (int byte = 0; byte < 8; byte++)
				hash = (hash ^ ((log->last[page] >> (8 * byte)) & 0xff)) * FNV_PRIME;
			stamped += log->last[page] != 0;
		}
		for (unsigned e = 0; e < MAX_EPOCHS; e++)
			sigbus += log->sigbus[e];
		report("\"kind\":\"mse.stamps\",\"thread\":%d,\"stores\":%llu,\"sigbus\":%llu,\"stamped\":%zu,\"hash\":%llu",
		       log->id, (unsigned long long)log->stores, (unsigned long long)sigbus, stamped,
		       (unsigned long long)hash);
	}
}

/* Read every stamp back through the mapping (MEM on): the guest's own view of what the server will check. */
static size_t readback(unsigned count, size_t *checked)
{
	size_t mismatches = 0;
	*checked = 0;
	for (unsigned i = 0; i < count; i++)
		for (size_t page = 0; page < pages; page++) {
			uint64_t value = 0;
			if (guarded(bar0, page * PAGE + (size_t)i * 8, &value, 0) < 0 || value != logs[i]->last[page])
				mismatches++;
			(*checked)++;
		}
	return mismatches;
}

/*
 * BAR0 mapped at an address aligned to its size (at most 1 GiB), where
 * huge-page faults can map it, or one page past such an address (misalign).
 */
static uint8_t *map_bar0(size_t *alignment, int misalign)
{
	size_t align = PAGE;
	while (align < bar0_region.size && align < (1UL << 30))
		align <<= 1;
	size_t span = bar0_region.size + align + PAGE;
	uint8_t *area = mmap(NULL, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (area == MAP_FAILED)
		return MAP_FAILED;
	uint8_t *start = (uint8_t *)(((uintptr_t)area + align - 1) & ~(uintptr_t)(align - 1)) + (misalign ? PAGE : 0);
	uint8_t *map = mmap(start, bar0_region.size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, dev.fd,
			    bar0_region.offset);
	if (map == MAP_FAILED)
		return MAP_FAILED;
	if (start > area)
		munmap(area, start - area);
	if (area + span > start + bar0_region.size)
		munmap(start + bar0_region.size, area + span - (start + bar0_region.size));
	/* What the address turned out to be aligned to (its lowest set bit), at most align. */
	uintptr_t lowest = (uintptr_t)map & -(uintptr_t)map;
	*alignment = lowest < align ? lowest : align;
	return map;
}

/*
 * The storm: concurrency at scale.  STORM_CYCLES times the main thread
 * clears MEM (vfio-pci zaps), changes the mappings now and then, sets MEM,
 * and releases every toucher at once through a barrier; each touches the
 * first and the last page of the mappings it owns (guarded loads), then
 * meets the others at a second barrier.  Touchers: THREADS threads in this
 * process on BAR0's mapping (one vma, the 2021 race) and on a second one
 * starting a page into the BAR (a non-zero offset); and STORM_PROCS child
 * processes with THREADS threads each, on the mapping they inherited and on
 * one they made themselves.  Between cycles the offset mapping is unmapped
 * and mapped afresh (every 8th cycle) and one page in the middle of it is
 * unmapped and mapped back on its own (every 16th: a vma split).  All of it
 * is one epoch, state "storm", whose MEM changes the server must see as
 * off/on pairs; the touches happen with MEM on, so any SIGBUS is a kernel
 * bug.  Faults are counted per toucher (getrusage) and summed per cycle.
 */
struct storm {
	pthread_barrier_t start, done;
	_Atomic int stop;
	_Atomic uint64_t touches, sigbus, faults;
	_Atomic uint64_t cycle_faults; /* this cycle's, reset by the controller */
	uint8_t *offset_map;	     /* the parent's mapping at BAR0 + PAGE (touchers in the parent use it) */
};

static struct storm *storm;

struct toucher {
	pthread_t thread;
	struct thread_log *log; /* made by the creating thread: new_log() is not thread-safe */
	uint8_t *own;		/* a mapping of the whole BAR this toucher's process made, or NULL */
	int child;
};

/* First and last page of a mapping of `length` bytes; the number of SIGBUS. */
static unsigned touch_ends(uint8_t *map, size_t length)
{
	uint64_t value;
	unsigned sigbus = 0;
	sigbus += guarded(map, 0, &value, 0) < 0;
	sigbus += guarded(map, length - PAGE, &value, 0) < 0;
	return sigbus;
}

static void *toucher(void *arg)
{
	struct toucher *self = arg;
	tl_log = self->log;
	for (;;) {
		pthread_barrier_wait(&storm->start);
		if (atomic_load(&storm->stop))
			break;
		long f0 = minor_faults();
		unsigned sigbus = touch_ends(bar0, bar0_region.size);
		unsigned touched = 2;
		if (self->own) {
			sigbus += touch_ends(self->own, bar0_region.size);
			touched += 2;
		}
		if (!self->child) {
			sigbus += touch_ends(storm->offset_map, bar0_region.size - PAGE);
			touched += 2;
		}
		long faults = minor_faults() - f0;
		atomic_fetch_add(&storm->touches, touched);
		atomic_fetch_add(&storm->sigbus, sigbus);
		atomic_fetch_add(&storm->faults, (uint64_t)faults);
		atomic_fetch_add(&storm->cycle_faults, (uint64_t)faults);
		pthread_barrier_wait(&storm->done);
	}
	return NULL;
}

static uint8_t *map_bar0_at(uint8_t *where, size_t length, size_t offset)
{
	return mmap(where, length, PROT_READ | PROT_WRITE, MAP_SHARED | (where ? MAP_FIXED : 0), dev.fd,
		    (off_t)(bar0_region.offset + offset));
}

/* A storm child process: its threads touch the inherited mapping and one of its own until told to stop. */
static void storm_child(unsigned nthreads)
{
	uint8_t *own = map_bar0_at(NULL, bar0_region.size, 0);
	struct toucher touchers[MAX_THREADS];
	for (unsigned i = 0; i < nthreads; i++) {
		touchers[i] = (struct toucher){.log = new_log(MAX_THREADS + 1), .own = own == MAP_FAILED ? NULL : own, .child = 1};
		pthread_create(&touchers[i].thread, NULL, toucher, &touchers[i]);
	}
	for (unsigned i = 0; i < nthreads; i++)
		pthread_join(touchers[i].thread, NULL);
	_exit(own == MAP_FAILED ? 3 : 0);
}

static int storm_phase(unsigned cycles, unsigned nthreads, unsigned procs)
{
	storm = mmap(NULL, sizeof(*storm), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (storm == MAP_FAILED) {
		report_error("mmap storm state");
		return -1;
	}
	pthread_barrierattr_t shared;
	pthread_barrierattr_init(&shared);
	pthread_barrierattr_setpshared(&shared, PTHREAD_PROCESS_SHARED);
	unsigned parties = 1 + nthreads * (1 + procs);
	pthread_barrier_init(&storm->start, &shared, parties);
	pthread_barrier_init(&storm->done, &shared, parties);
	storm->offset_map = map_bar0_at(NULL, bar0_region.size - PAGE, PAGE);
	if (storm->offset_map == MAP_FAILED) {
		report_error("mmap BAR0 at an offset");
		return -1;
	}
	pid_t children[16];
	for (unsigned p = 0; p < procs; p++) {
		children[p] = fork();
		if (children[p] == 0)
			storm_child(nthreads);
	}
	struct toucher touchers[MAX_THREADS];
	for (unsigned i = 0; i < nthreads; i++) {
		touchers[i] = (struct toucher){.log = new_log(MAX_THREADS + 1)};
		pthread_create(&touchers[i].thread, NULL, toucher, &touchers[i]);
	}

	uint32_t e = next_epoch();
	epochs[e - 1].doorbell = doorbell(e);
	begin_epoch(e, STORM, "storm");
	atomic_store(&current_epoch, e);
	atomic_store(&settled_epoch, ENABLING);
	size_t middle = (bar0_region.size - PAGE) / 2 / PAGE * PAGE;
	uint64_t fewest = UINT64_MAX, most = 0, remaps = 0, splits = 0, churn_failures = 0;
	int64_t t0 = now_ns();
	unsigned done;
	for (done = 0; done < cycles; done++) {
		if (set_memory(0)) {
			report_error("config write MEM off (storm)");
			break;
		}
		if (done % 8 == 7) {
			munmap(storm->offset_map, bar0_region.size - PAGE);
			storm->offset_map = map_bar0_at(NULL, bar0_region.size - PAGE, PAGE);
			churn_failures += storm->offset_map == MAP_FAILED;
			remaps++;
		}
		if (done % 16 == 15 && middle) {
			munmap(storm->offset_map + middle, PAGE);
			churn_failures += map_bar0_at(storm->offset_map + middle, PAGE, PAGE + middle) == MAP_FAILED;
			splits++;
		}
		if (churn_failures) {
			errno = ENOMEM;
			report_error("mmap BAR0 again (storm churn)");
			break;
		}
		if (set_memory(1)) {
			report_error("config write MEM on (storm)");
			break;
		}
		atomic_store(&storm->cycle_faults, 0);
		pthread_barrier_wait(&storm->start);
		pthread_barrier_wait(&storm->done);
		uint64_t faults = atomic_load(&storm->cycle_faults);
		fewest = faults < fewest ? faults : fewest;
		most = faults > most ? faults : most;
		if ((done + 1) % 100 == 0)
			report("\"kind\":\"mse.storm.progress\",\"cycles\":%u,\"sigbus\":%llu,\"ns\":%lld", done + 1,
			       (unsigned long long)atomic_load(&storm->sigbus), (long long)(now_ns() - t0));
	}
	int64_t took = now_ns() - t0;
	atomic_store(&storm->stop, 1);
	pthread_barrier_wait(&storm->start);
	for (unsigned i = 0; i < nthreads; i++)
		pthread_join(touchers[i].thread, NULL);
	int children_ok = 1;
	for (unsigned p = 0; p < procs; p++) {
		int status = 0;
		waitpid(children[p], &status, 0);
		children_ok = children_ok && WIFEXITED(status) && WEXITSTATUS(status) == 0;
	}
	uint32_t after = next_epoch();
	begin_epoch(after, ENABLED, "storm");
	atomic_store(&current_epoch, after);
	atomic_store(&settled_epoch, after);
	epochs[e].doorbell = doorbell(after);
	uint64_t sigbus = atomic_load(&storm->sigbus);
	report("\"kind\":\"mse.storm\",\"epoch\":%u,\"cycles\":%u,\"requested\":%u,\"threads\":%u,\"processes\":%u,"
	       "\"touchers\":%u,\"touches\":%llu,\"sigbus\":%llu,\"faults\":%llu,\"faults_per_cycle_min\":%llu,"
	       "\"faults_per_cycle_max\":%llu,\"remaps\":%llu,\"splits\":%llu,\"children_ok\":%s,\"ns\":%lld",
	       e, done, cycles, nthreads, procs, parties - 1, (unsigned long long)atomic_load(&storm->touches),
	       (unsigned long long)sigbus, (unsigned long long)atomic_load(&storm->faults),
	       (unsigned long long)(done ? fewest : 0), (unsigned long long)most, (unsigned long long)remaps,
	       (unsigned long long)splits, children_ok ? "true" : "false", (long long)took);
	return done == cycles && children_ok && sigbus == 0 ? 0 : 1;
}

/* -- closing the device while MEM is off and BAR0 is mapped -------------------------- */

struct close_steps {
	char text[512];
	int len;
	int64_t started;
};

/* Report one step the moment it is done (a hang shows as the step after the last one reported) and keep it. */
static void close_step(struct close_steps *steps, const char *name, const char *outcome)
{
	report("\"kind\":\"mse.close.step\",\"step\":\"%s\",\"result\":\"%s\",\"ns\":%lld", name, outcome,
	       (long long)(now_ns() - steps->started));
	steps->len += snprintf(steps->text + steps->len, sizeof(steps->text) - steps->len, "%s\"%s\":\"%s\"",
			       steps->len ? "," : "", name, outcome);
}

static const char *touch_outcome(uint8_t *map)
{
	uint64_t value;
	return guarded(map, 0, &value, 0) < 0 ? "sigbus" : "ok";
}

/*
 * The same ordering ended by a process's exit instead of munmap: a child
 * opens the device itself, maps BAR0, clears MEM, checks that the mapping
 * faults, closes the device fd, group and container and exits with the
 * mapping in place, so that the exit drops the last reference to the
 * device.  Exit status 0 when each of those steps went as expected.
 */
static void exiting_child(const char *addr)
{
	struct vfio_dev own;
	struct vfio_region_info config, bar;
	if (vfio_open(addr, &own) < 0)
		_exit(3);
	if (vfio_region(&own, VFIO_PCI_CONFIG_REGION_INDEX, &config) < 0 ||
	    vfio_region(&own, VFIO_PCI_BAR0_REGION_INDEX, &bar) < 0)
		_exit(4);
	uint8_t *map = mmap(NULL, bar.size, PROT_READ | PROT_WRITE, MAP_SHARED, own.fd, bar.offset);
	if (map == MAP_FAILED)
		_exit(5);
	uint16_t value;
	if (pread(own.fd, &value, sizeof(value), config.offset + PCI_COMMAND) != sizeof(value))
		_exit(6);
	value &= ~PCI_COMMAND_MEMORY;
	if (pwrite(own.fd, &value, sizeof(value), config.offset + PCI_COMMAND) != sizeof(value))
		_exit(6);
	uint64_t word;
	if (guarded(map, 0, &word, 0) == 0)
		_exit(7);
	if (close(own.fd) || close(own.group) || close(own.container))
		_exit(8);
	_exit(0);
}

/*
 * The ordering behind a 2026 vfio-pci hang: MEM is cleared (vfio-pci zaps
 * BAR0), the mapping stays, and the device fd, the group and the container
 * are closed while it does.  The mapping holds the device file, so the
 * device is released only when it goes: at the munmap.  A child then does
 * the same on a device it opens itself and exits instead of unmapping
 * (exiting_child).  Last, the device is opened again from scratch, mapped,
 * and thread 0's last stamp on page 0 is read back through the new mapping.
 * Runs last (the program's device fds are gone after it).  Expected: each step returns (bounded by the run's
 * timeout, not by a sleep here), a touch of the zapped mapping raises
 * SIGBUS before and after the closes, the re-open works and the stamp is
 * there, and the child exits 0.  0 when every step went as expected.
 */
static int close_phase(const char *addr)
{
	struct close_steps steps = {.started = now_ns()};
	close_step(&steps, "mem_off", errno_name(set_memory(0)));
	close_step(&steps, "touch_disabled", touch_outcome(bar0));
	close_step(&steps, "close_device", errno_name(close(dev.fd) ? errno : 0));
	close_step(&steps, "close_group", errno_name(close(dev.group) ? errno : 0));
	close_step(&steps, "close_container", errno_name(close(dev.container) ? errno : 0));
	close_step(&steps, "touch_closed", touch_outcome(bar0));
	int unmapped = munmap(bar0, bar0_region.size) ? errno : 0;
	if (!unmapped && storm && storm->offset_map != MAP_FAILED)
		unmapped = munmap(storm->offset_map, bar0_region.size - PAGE) ? errno : 0;
	close_step(&steps, "munmap", errno_name(unmapped));
	char exited[24] = "fork failed";
	pid_t child = fork();
	if (child == 0)
		exiting_child(addr);
	int status = 0;
	if (child > 0 && waitpid(child, &status, 0) == child) {
		if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
			snprintf(exited, sizeof(exited), "ok");
		else if (WIFEXITED(status))
			snprintf(exited, sizeof(exited), "status %d", WEXITSTATUS(status));
		else
			snprintf(exited, sizeof(exited), "signal %d", WTERMSIG(status));
	}
	close_step(&steps, "child_exit", exited);

	int ok = 0;
	const char *value = "not read";
	if (vfio_open(addr, &dev) == 0 && vfio_region(&dev, VFIO_PCI_CONFIG_REGION_INDEX, &config_region) == 0 &&
	    vfio_region(&dev, VFIO_PCI_BAR0_REGION_INDEX, &bar0_region) == 0 &&
	    vfio_region(&dev, VFIO_PCI_BAR2_REGION_INDEX, &bar2_region) == 0 && read_command(&command) == 0) {
		close_step(&steps, "reopen", "ok");
		if (!(command & PCI_COMMAND_MEMORY))
			close_step(&steps, "mem_on", errno_name(set_memory(1)));
		size_t alignment;
		bar0 = map_bar0(&alignment, 0);
		close_step(&steps, "map", bar0 == MAP_FAILED ? errno_name(errno) : "ok");
		if (bar0 != MAP_FAILED) {
			uint64_t stamp = 0;
			if (guarded(bar0, 0, &stamp, 0) < 0)
				value = "sigbus";
			else
				value = stamp == logs[0]->last[0] ? "match" : "mismatch";
			close_step(&steps, "stamp_reopened", value);
			ok = 1;
		}
	} else {
		close_step(&steps, "reopen", "failed");
	}
	report("\"kind\":\"mse.close\",%s", steps.text);
	return !(ok && strcmp(value, "match") == 0);
}

static void usage(const char *argv0)
{
	fprintf(stderr,
		"usage: %s [-m guest|server|combined] [-t THREADS] [-c CYCLES] [-p PERIOD_MS] [-d SECONDS] "
		"[-l LATENCY_CYCLES] [-s STORM_CYCLES] [-P STORM_PROCS] [-R] [-F] [-u] [-D] [-H] [-C] [ADDR]\n",
		argv0);
	exit(2);
}

int main(int argc, char **argv)
{
	const char *mode = "guest";
	unsigned nthreads = 4, cycles = 8, period_ms = 20, seconds = 3, latency_cycles = 6, storm_cycles = 0,
		 storm_procs = 2;
	int do_reset = 1, do_fork = 1, misalign = 0, do_d3hot = 1, do_hot_reset = 1, do_close = 1, opt;
	while ((opt = getopt(argc, argv, "m:t:c:p:d:l:s:P:RFuDHC")) != -1) {
		switch (opt) {
		case 'm': mode = optarg; break;
		case 't': nthreads = strtoul(optarg, NULL, 0); break;
		case 'c': cycles = strtoul(optarg, NULL, 0); break;
		case 'p': period_ms = strtoul(optarg, NULL, 0); break;
		case 'd': seconds = strtoul(optarg, NULL, 0); break;
		case 'l': latency_cycles = strtoul(optarg, NULL, 0); break;
		case 's': storm_cycles = strtoul(optarg, NULL, 0); break;
		case 'P': storm_procs = strtoul(optarg, NULL, 0); break;
		case 'R': do_reset = 0; break;
		case 'F': do_fork = 0; break;
		case 'u': misalign = 1; break;
		case 'D': do_d3hot = 0; break;
		case 'H': do_hot_reset = 0; break;
		case 'C': do_close = 0; break;
		default: usage(argv[0]);
		}
	}
	int server_mode = strcmp(mode, "server") == 0, combined = strcmp(mode, "combined") == 0;
	if ((!server_mode && !combined && strcmp(mode, "guest") != 0) || nthreads < 1 || nthreads > MAX_THREADS ||
	    2 * (cycles + latency_cycles) + 8 >= MAX_EPOCHS || storm_procs > 16 || optind < argc - 1)
		usage(argv[0]);
	program_start = now_ns();

	char addr[NAME_MAX + 1], driver[64];
	const char *failed[12];
	unsigned num_failed = 0;
	if (optind == argc - 1)
		snprintf(addr, sizeof(addr), "%s", argv[optind]);
	else if (pci_find(MEMBAR_VENDOR, MEMBAR_DEVICE, addr, sizeof(addr)) < 0) {
		report_error("find membar 1b36:0f01");
		goto done;
	}
	if (vfio_bind(addr) < 0) {
		report_error("bind to vfio-pci");
		goto done;
	}
	pci_driver(addr, driver, sizeof(driver));
	report("\"kind\":\"mse.bound\",\"addr\":\"%s\",\"driver\":\"%s\"", addr, driver);
	if (vfio_open(addr, &dev) < 0)
		goto done;
	if (vfio_region(&dev, VFIO_PCI_CONFIG_REGION_INDEX, &config_region) < 0 ||
	    vfio_region(&dev, VFIO_PCI_BAR0_REGION_INDEX, &bar0_region) < 0 ||
	    vfio_region(&dev, VFIO_PCI_BAR2_REGION_INDEX, &bar2_region) < 0) {
		report_error("VFIO_DEVICE_GET_REGION_INFO");
		goto done;
	}
	if (!(bar0_region.flags & VFIO_REGION_INFO_FLAG_MMAP) || bar0_region.size < PAGE) {
		errno = ENOTSUP;
		report_error("BAR0 cannot be mapped");
		goto done;
	}
	pages = bar0_region.size / PAGE;
	if (read_command(&command) < 0) {
		report_error("read COMMAND");
		goto done;
	}
	/* vfio-pci enables the device when it is opened; make sure, since epoch 0 is "MEM on". */
	if (!(command & PCI_COMMAND_MEMORY) && set_memory(1)) {
		report_error("config write MEM on");
		goto done;
	}
	size_t alignment;
	bar0 = map_bar0(&alignment, misalign);
	if (bar0 == MAP_FAILED) {
		report_error("mmap BAR0");
		goto done;
	}
	report("\"kind\":\"mse.device\",\"addr\":\"%s\",\"group\":%d,\"bar0_size\":%llu,\"bar0_offset\":%llu,"
	       "\"pages\":%zu,\"bar2_offset\":%llu,\"config_offset\":%llu,\"command\":%u,\"map_alignment\":%zu,"
	       "\"mode\":\"%s\",\"threads\":%u",
	       addr, dev.group_id, (unsigned long long)bar0_region.size, (unsigned long long)bar0_region.offset, pages,
	       (unsigned long long)bar2_region.offset, (unsigned long long)config_region.offset, command, alignment,
	       mode, nthreads);

	struct sigaction action = {.sa_sigaction = on_sigbus, .sa_flags = SA_SIGINFO | SA_NODEFER};
	sigemptyset(&action.sa_mask);
	sigaction(SIGBUS, &action, NULL);
	int enabled_pread = pread_bar0();
	begin_epoch(0, ENABLED, "start");
	int error = doorbell(0);
	if (error) {
		errno = error;
		report_error("doorbell");
	}
	int d3hot_result = 0;
	start_workers(nthreads);
	tl_log = new_log(-1); /* the main thread's own accesses (first touches), after the workers' logs */
	if (server_mode) {
		report("\"kind\":\"mse.ready\",\"mode\":\"server\",\"seconds\":%u", seconds);
		watch_phase(seconds);
		stop_workers(nthreads);
	} else if (combined) {
		combined_phase(seconds, period_ms);
		stop_workers(nthreads);
	} else {
		if (do_reset)
			reset_phase(period_ms);
		toggle_phase(cycles, period_ms);
		if (do_d3hot)
			d3hot_result = d3hot_phase(period_ms);
		if (do_hot_reset)
			hot_reset_phase(period_ms);
		stop_workers(nthreads);
		latency_phase(latency_cycles);
	}
	int guest_mode = !server_mode && !combined;
	/* The fork phase reads pages 1 to 3 of BAR0. */
	int fork_result = do_fork && guest_mode && pages >= 4 ? fork_phase() : 0;
	int storm_result = storm_cycles && guest_mode ? storm_phase(storm_cycles, nthreads, storm_procs) : 0;

	uint32_t last = atomic_load(&current_epoch);
	/* Close the last epoch in the server's log: what follows (closing the device resets it) is no epoch's. */
	int closing = doorbell(last + 1);
	uint64_t sigbus_enabled = 0, stored_disabled = 0;
	struct errno_counts pread_disabled = {0}, doorbell_disabled = {0};
	uint64_t sigbus = report_epochs(last, &sigbus_enabled, &stored_disabled, &pread_disabled, &doorbell_disabled);
	report("\"kind\":\"mse.eio\",\"bar0_pread_enabled\":\"%s\",\"bar0_pread_disabled\":{\"ok\":%u,\"EIO\":%u,"
	       "\"other\":%u},\"bar2_pwrite_disabled\":{\"ok\":%u,\"EIO\":%u,\"other\":%u}",
	       errno_name(enabled_pread), pread_disabled.ok, pread_disabled.eio, pread_disabled.other,
	       doorbell_disabled.ok, doorbell_disabled.eio, doorbell_disabled.other);
	report_stamps(nthreads);
	size_t checked;
	size_t mismatches = readback(nthreads, &checked);
	report("\"kind\":\"mse.readback\",\"mismatches\":%zu,\"checked\":%zu", mismatches, checked);
	int close_result = do_close && guest_mode ? close_phase(addr) : 0;

	if (mismatches)
		failed[num_failed++] = "readback";
	if (enabled_pread)
		failed[num_failed++] = "pread_enabled";
	if (!server_mode) {
		/* What vfio-pci promises when the guest itself clears MEM. */
		if (sigbus_enabled)
			failed[num_failed++] = "sigbus_enabled";
		if (stored_disabled)
			failed[num_failed++] = "stored_while_disabled";
		if (pread_disabled.ok || pread_disabled.other || doorbell_disabled.ok || doorbell_disabled.other)
			failed[num_failed++] = "eio";
		if (combined && trapped.ok_while_disabled)
			failed[num_failed++] = "trapped_read_while_disabled";
		if (fork_result)
			failed[num_failed++] = "fork";
		if (storm_result)
			failed[num_failed++] = "storm";
		if (d3hot_result)
			failed[num_failed++] = "d3hot";
		if (close_result)
			failed[num_failed++] = "close";
	}
	char names[192] = "";
	for (unsigned i = 0, len = 0; i < num_failed; i++)
		len += snprintf(names + len, sizeof(names) - len, "%s\"%s\"", i ? "," : "", failed[i]);
	report("\"kind\":\"mse.done\",\"status\":%d,\"mode\":\"%s\",\"epochs\":%u,\"sigbus\":%llu,\"sigbus_enabled\":%llu,"
	       "\"stored_while_disabled\":%llu,\"closing_doorbell\":\"%s\",\"failed\":[%s]",
	       vdev_failures || num_failed ? 1 : 0, mode, last + 1, (unsigned long long)sigbus,
	       (unsigned long long)sigbus_enabled, (unsigned long long)stored_disabled, errno_name(closing), names);
	return vdev_failures || num_failed ? 1 : 0;
done:
	report("\"kind\":\"mse.done\",\"status\":1,\"mode\":\"%s\",\"failed\":[\"setup\"]", mode);
	return 1;
}
