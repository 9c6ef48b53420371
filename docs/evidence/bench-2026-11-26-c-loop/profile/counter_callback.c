#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <stdbool.h>
static uint32_t counter;
ssize_t counter_cb(void *ctx, char *buf, size_t count, long offset, bool is_write)
{
    if (!is_write) { counter++; memcpy(buf, &counter, count < 4 ? count : 4); }
    return count;
}
