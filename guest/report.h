/*
 * report.h: result lines for the harness (vdev/qemu/guest.py), one JSON
 * object per line after the marker "VDEV ".
 *
 * A program defines VDEV_PROGRAM (its result-kind prefix, e.g. "mse") before
 * including this header.  Errors are then reported as
 *   VDEV {"kind":"<prefix>.error","op":"...","errno":N,"message":"..."}
 * and counted in vdev_failures, so a program ends with a summary whose
 * status says whether any step failed.
 */
#ifndef VDEV_REPORT_H
#define VDEV_REPORT_H

#ifndef VDEV_PROGRAM
#error "define VDEV_PROGRAM (the result-kind prefix) before including report.h"
#endif

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int vdev_failures;

/*
 * One result line, written with a single write(2): several threads (and a
 * forked child) report concurrently, and the console must never interleave
 * two lines.
 */
static inline void report(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static inline void report(const char *fmt, ...)
{
	char line[2048];
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
		_exit(2);
}

/* Report a failed step with errno's value (saved first: report() may change it). */
static inline void report_error(const char *op)
{
	int saved = errno;
	vdev_failures++;
	report("\"kind\":\"" VDEV_PROGRAM ".error\",\"op\":\"%s\",\"errno\":%d,\"message\":\"%s\"", op, saved,
	       strerror(saved));
	errno = saved;
}

#endif
