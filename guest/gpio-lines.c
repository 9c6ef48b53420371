/*
 * gpio-lines: drive and read the lines of the GPIO chip a PCI function's
 * driver registered, through the GPIO character device (uAPI v2), the way
 * an application would.
 *
 *   gpio-lines [-o LINE=VALUE]... [-i LINE]... [-e LINE]... [-t TIMEOUT_MS] ADDR
 *
 * The chip is the gpiochipN under /sys/bus/pci/devices/ADDR (gpiolib makes
 * it a child of the device whose driver added it); its /dev node comes from
 * devtmpfs, which /init mounts.  Steps, each reported:
 *   -o  request those lines as outputs (GPIO_V2_GET_LINE_IOCTL), set them
 *       with GPIO_V2_LINE_SET_VALUES_IOCTL, read them back with
 *       GPIO_V2_LINE_GET_VALUES_IOCTL (the driver reads its output latch);
 *   -i  request those lines as inputs and read them (GET_VALUES);
 *   -e  request those lines as inputs with edge detection on both edges
 *       (one request), say so, and read edge events until one arrives for
 *       the first -e line, at most TIMEOUT_MS (5000) in all (the driver's
 *       interrupt path).  Every event read is reported: a card that cannot
 *       tell which input changed notifies every line with edge detection.
 *
 * Output, one line each:
 *   VDEV {"kind":"gpio.chip","addr":...,"path":"/dev/gpiochipN","name":...,"label":...,"lines":N}
 *   VDEV {"kind":"gpio.set","lines":[...],"values":[...]}
 *   VDEV {"kind":"gpio.outputs","lines":[...],"values":[...]}     (read back)
 *   VDEV {"kind":"gpio.inputs","lines":[...],"values":[...]}
 *   VDEV {"kind":"gpio.waiting","lines":[...]}
 *   VDEV {"kind":"gpio.edge","line":N,"rising":true|false,"seqno":N,"line_seqno":N}   (one per event)
 *   VDEV {"kind":"gpio.timeout","line":N}          (no event for the first -e line in time)
 *   VDEV {"kind":"gpio.error","op":...,"errno":N,"message":...}
 *   VDEV {"kind":"gpio.done","status":N}
 */
#define _GNU_SOURCE
#define VDEV_PROGRAM "gpio"
#include "report.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/gpio.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <time.h>

#define MAX_LINES GPIO_V2_LINES_MAX

struct lines {
	unsigned count;
	unsigned offsets[MAX_LINES];
	int values[MAX_LINES];
};

/* "0,1,0" from the low bits of a GPIO_V2 value bitmap, in request order. */
static void format_values(char *text, size_t size, const struct lines *lines, uint64_t bits)
{
	size_t len = 0;
	text[0] = '\0';
	for (unsigned i = 0; i < lines->count; i++)
		len += snprintf(text + len, size - len, "%s%d", i ? "," : "", (int)(bits >> i & 1));
}

static void format_offsets(char *text, size_t size, const struct lines *lines)
{
	size_t len = 0;
	text[0] = '\0';
	for (unsigned i = 0; i < lines->count; i++)
		len += snprintf(text + len, size - len, "%s%u", i ? "," : "", lines->offsets[i]);
}

/* /dev/gpiochipN for the chip the driver of PCI function addr registered; -1 when there is none. */
static int find_chip(const char *addr, char *path, size_t size)
{
	char dir_path[256];
	snprintf(dir_path, sizeof(dir_path), "/sys/bus/pci/devices/%s", addr);
	DIR *dir = opendir(dir_path);
	if (!dir)
		return -1;
	int found = -1;
	for (struct dirent *entry; found < 0 && (entry = readdir(dir));) {
		if (strncmp(entry->d_name, "gpiochip", 8) == 0) {
			snprintf(path, size, "/dev/%s", entry->d_name);
			found = 0;
		}
	}
	closedir(dir);
	if (found < 0)
		errno = ENODEV;
	return found;
}

/* A line request for lines with flags; the request's fd, or -1. */
static int request(int chip, const struct lines *lines, uint64_t flags)
{
	struct gpio_v2_line_request req = {.num_lines = lines->count, .config.flags = flags};
	memcpy(req.offsets, lines->offsets, lines->count * sizeof(lines->offsets[0]));
	snprintf(req.consumer, sizeof(req.consumer), "vdev-gpio-lines");
	if (ioctl(chip, GPIO_V2_GET_LINE_IOCTL, &req) < 0)
		return -1;
	return req.fd;
}

static int get_values(int fd, const struct lines *lines, uint64_t *bits)
{
	struct gpio_v2_line_values values = {.mask = (lines->count == 64) ? ~0ULL : (1ULL << lines->count) - 1};
	if (ioctl(fd, GPIO_V2_LINE_GET_VALUES_IOCTL, &values) < 0)
		return -1;
	*bits = values.bits;
	return 0;
}

static void drive_outputs(int chip, const struct lines *outputs)
{
	char offsets[512], text[512];
	int fd = request(chip, outputs, GPIO_V2_LINE_FLAG_OUTPUT);
	if (fd < 0) {
		report_error("request outputs");
		return;
	}
	struct gpio_v2_line_values values = {.mask = (1ULL << outputs->count) - 1};
	for (unsigned i = 0; i < outputs->count; i++)
		values.bits |= (uint64_t)(outputs->values[i] & 1) << i;
	format_offsets(offsets, sizeof(offsets), outputs);
	if (ioctl(fd, GPIO_V2_LINE_SET_VALUES_IOCTL, &values) < 0) {
		report_error("GPIO_V2_LINE_SET_VALUES_IOCTL");
	} else {
		format_values(text, sizeof(text), outputs, values.bits);
		report("\"kind\":\"gpio.set\",\"lines\":[%s],\"values\":[%s]", offsets, text);
	}
	uint64_t bits;
	if (get_values(fd, outputs, &bits) < 0) {
		report_error("GPIO_V2_LINE_GET_VALUES_IOCTL outputs");
	} else {
		format_values(text, sizeof(text), outputs, bits);
		report("\"kind\":\"gpio.outputs\",\"lines\":[%s],\"values\":[%s]", offsets, text);
	}
	close(fd);
}

static void read_inputs(int chip, const struct lines *inputs)
{
	char offsets[512], text[512];
	int fd = request(chip, inputs, GPIO_V2_LINE_FLAG_INPUT);
	if (fd < 0) {
		report_error("request inputs");
		return;
	}
	uint64_t bits;
	if (get_values(fd, inputs, &bits) < 0) {
		report_error("GPIO_V2_LINE_GET_VALUES_IOCTL inputs");
	} else {
		format_offsets(offsets, sizeof(offsets), inputs);
		format_values(text, sizeof(text), inputs, bits);
		report("\"kind\":\"gpio.inputs\",\"lines\":[%s],\"values\":[%s]", offsets, text);
	}
	close(fd);
}

static long long now_ms(void)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return now.tv_sec * 1000LL + now.tv_nsec / 1000000;
}

static void wait_edges(int chip, const struct lines *edges, int timeout_ms)
{
	char offsets[512];
	int fd = request(chip, edges, GPIO_V2_LINE_FLAG_INPUT | GPIO_V2_LINE_FLAG_EDGE_RISING |
					      GPIO_V2_LINE_FLAG_EDGE_FALLING);
	if (fd < 0) {
		report_error("request edge events");
		return;
	}
	format_offsets(offsets, sizeof(offsets), edges);
	report("\"kind\":\"gpio.waiting\",\"lines\":[%s]", offsets);
	const unsigned watched = edges->offsets[0];
	const long long deadline = now_ms() + timeout_ms;
	for (int seen = 0; !seen;) {
		long long left = deadline - now_ms();
		struct pollfd ready = {.fd = fd, .events = POLLIN};
		int n = left > 0 ? poll(&ready, 1, (int)left) : 0;
		if (n < 0) {
			report_error("poll");
			break;
		}
		if (n == 0) {
			report("\"kind\":\"gpio.timeout\",\"line\":%u", watched);
			vdev_failures++;
			break;
		}
		struct gpio_v2_line_event events[MAX_LINES];
		ssize_t got = read(fd, events, sizeof(events));
		if (got < (ssize_t)sizeof(events[0]) || got % sizeof(events[0])) {
			report_error("read edge events");
			break;
		}
		for (size_t i = 0; i < (size_t)got / sizeof(events[0]); i++) {
			const struct gpio_v2_line_event *event = &events[i];
			report("\"kind\":\"gpio.edge\",\"line\":%u,\"rising\":%s,\"seqno\":%u,\"line_seqno\":%u",
			       event->offset, event->id == GPIO_V2_LINE_EVENT_RISING_EDGE ? "true" : "false",
			       event->seqno, event->line_seqno);
			seen |= event->offset == watched;
		}
	}
	close(fd);
}

static void usage(const char *argv0)
{
	fprintf(stderr, "usage: %s [-o LINE=VALUE]... [-i LINE]... [-e LINE]... [-t TIMEOUT_MS] ADDR\n", argv0);
	exit(2);
}

int main(int argc, char **argv)
{
	struct lines outputs = {0}, inputs = {0}, edges = {0};
	int timeout_ms = 5000, opt;
	while ((opt = getopt(argc, argv, "o:i:e:t:")) != -1) {
		char *end;
		switch (opt) {
		case 'o':
			if (outputs.count == MAX_LINES)
				usage(argv[0]);
			outputs.offsets[outputs.count] = strtoul(optarg, &end, 0);
			if (*end != '=')
				usage(argv[0]);
			outputs.values[outputs.count++] = atoi(end + 1);
			break;
		case 'i':
			if (inputs.count == MAX_LINES)
				usage(argv[0]);
			inputs.offsets[inputs.count++] = strtoul(optarg, NULL, 0);
			break;
		case 'e':
			if (edges.count == MAX_LINES)
				usage(argv[0]);
			edges.offsets[edges.count++] = strtoul(optarg, NULL, 0);
			break;
		case 't': timeout_ms = atoi(optarg); break;
		default: usage(argv[0]);
		}
	}
	if (optind != argc - 1)
		usage(argv[0]);
	const char *addr = argv[optind];

	char path[300];
	int chip = -1;
	if (find_chip(addr, path, sizeof(path)) < 0) {
		report_error("find gpiochip");
		goto done;
	}
	chip = open(path, O_RDWR | O_CLOEXEC);
	struct gpiochip_info info;
	if (chip < 0 || ioctl(chip, GPIO_GET_CHIPINFO_IOCTL, &info) < 0) {
		report_error(path);
		goto done;
	}
	report("\"kind\":\"gpio.chip\",\"addr\":\"%s\",\"path\":\"%s\",\"name\":\"%s\",\"label\":\"%s\",\"lines\":%u", addr,
	       path, info.name, info.label, info.lines);
	if (outputs.count)
		drive_outputs(chip, &outputs);
	if (inputs.count)
		read_inputs(chip, &inputs);
	if (edges.count)
		wait_edges(chip, &edges, timeout_ms);
done:
	report("\"kind\":\"gpio.done\",\"status\":%d", vdev_failures ? 1 : 0);
	return vdev_failures ? 1 : 0;
}
