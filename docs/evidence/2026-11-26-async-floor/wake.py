"""Server CPU per message: a blocking thread vs a Trio task woken by epoll, one core."""
import os, socket, sys, time, resource
import trio
os.sched_setaffinity(0, {1})
N = 20000

def client(sock):
    msg = b"x" * 16
    for _ in range(N + 500):
        sock.send(msg); sock.recv(64)
    sock.close()

def spawn():
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        a.close(); client(b); os._exit(0)
    b.close()
    return a, pid

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

def blocking():
    s, pid = spawn()
    for _ in range(500):
        s.recv(64); s.send(b"y" * 16)
    c0 = cpu()
    for _ in range(N):
        s.recv(64); s.send(b"y" * 16)
    used = cpu() - c0
    os.waitpid(pid, 0)
    return used / N * 1e6

async def trio_task():
    s, pid = spawn()
    s.setblocking(False)
    fd = s.fileno()
    for i in range(N + 500):
        if i == 500:
            c0 = cpu()
        await trio.lowlevel.wait_readable(fd)
        s.recv(64); s.send(b"y" * 16)
    used = cpu() - c0
    os.waitpid(pid, 0)
    return used / N * 1e6

async def trio_try_first():
    s, pid = spawn()
    s.setblocking(False)
    fd = s.fileno()
    for i in range(N + 500):
        if i == 500:
            c0 = cpu()
        while True:
            try:
                s.recv(64)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
        s.send(b"y" * 16)
    used = cpu() - c0
    os.waitpid(pid, 0)
    return used / N * 1e6

for _ in range(2):
    print("blocking thread  %.1f us" % blocking())
    print("trio wait_readable  %.1f us" % trio.run(trio_task))
    print("trio try-first  %.1f us" % trio.run(trio_try_first))
