/* Scratch: the gpio sample's register served four ways, to find what costs on a cold CPU. */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/epoll.h>
#include <unistd.h>
#include "libvfio-user.h"

static uint32_t counter;
static ssize_t bar2(vfu_ctx_t *c, char *buf, size_t count, loff_t off, bool w)
{ if (!w) { counter++; memcpy(buf, &counter, count < 4 ? count : 4); } return count; }
static void dma_cb(vfu_ctx_t *c, vfu_dma_info_t *i) {}
static const char *mode;
static vfu_ctx_t *ctx;
static int wakefd;

static void *serve(void *arg)
{
    for (;;) {
        if (vfu_attach_ctx(ctx) < 0) { if (errno == EAGAIN || errno == EWOULDBLOCK) { struct pollfd p = {vfu_get_poll_fd(ctx), POLLIN}; poll(&p, 1, -1); continue; } perror("attach"); exit(1); }
        int conn = vfu_get_poll_fd(ctx);
        if (getenv("RCVTIMEO")) { struct timeval tv = {1, 0}; setsockopt(conn, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)); }
        for (;;) {
            if (strcmp(mode, "block") == 0) {
                if (vfu_run_ctx(ctx) < 0 && errno != EINTR) break;
                continue;
            }
            if (strcmp(mode, "peek") == 0) {
                char b; if (recv(conn, &b, 1, MSG_PEEK) < 0 && errno == EAGAIN) continue;
                int r = vfu_run_ctx(ctx);
                if (r < 0 && errno != EAGAIN) break;
                continue;
            }
            struct pollfd p[2] = {{conn, POLLIN}, {wakefd, POLLIN}};
            poll(p, strcmp(mode, "poll1") == 0 ? 1 : 2, -1);
            int r = vfu_run_ctx(ctx);
            if (r < 0 && errno != EAGAIN) break;
        }
    }
    return NULL;
}

int main(int argc, char **argv)
{
    mode = argv[1];
    int nb = strcmp(mode, "block") != 0;
    ctx = vfu_create_ctx(VFU_TRANS_SOCK, argv[2], nb ? LIBVFIO_USER_FLAG_ATTACH_NB : 0, NULL, VFU_DEV_TYPE_PCI);
    vfu_pci_init(ctx, VFU_PCI_TYPE_CONVENTIONAL, PCI_HEADER_TYPE_NORMAL, 0);
    vfu_pci_set_id(ctx, 0x494f, 0x0dc8, 0, 0);
    vfu_setup_region(ctx, VFU_PCI_DEV_BAR2_REGION_IDX, 0x100, &bar2, VFU_REGION_FLAG_RW, NULL, 0, -1, 0);
    vfu_setup_device_nr_irqs(ctx, VFU_DEV_INTX_IRQ, 1);
    vfu_setup_device_dma(ctx, dma_cb, dma_cb);
    if (vfu_realize_ctx(ctx) < 0) { perror("realize"); return 1; }
    wakefd = eventfd(0, EFD_NONBLOCK);
    if (strcmp(mode, "thread") == 0) {
        pthread_t t; pthread_create(&t, NULL, serve, NULL);
        int ep = epoll_create1(0); struct epoll_event e; epoll_wait(ep, &e, 1, -1);
    } else {
        serve(NULL);
    }
    return 0;
}
