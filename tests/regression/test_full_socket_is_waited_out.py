"""A burst larger than the socket buffer is written when the socket takes it.

dbus-next's writer took ``EAGAIN`` from ``send`` for a lost connection: a host of
128 PCI functions or more killed vfiod before it owned its name (exporting the
objects queued more than the socket buffer holds), and 128 pipelined
``GetManagedObjects`` from one unprivileged client left it alive, unexported and
deaf.  The writer of `vfiod.wire.transport` waits for the socket instead; every byte arrives,
in order, fds included."""

import array
import asyncio
import os
import socket

import pytest
from dbus_next import Message
from dbus_next.aio.message_bus import _MessageWriter

from vfiod.wire.transport import _PatientWriter


class _Bus:
    """What a writer reads of its bus: the socket, the loop, and how it ends."""

    def __init__(self, sock, loop):
        self._sock, self._fd, self._loop = sock, sock.fileno(), loop
        self._negotiate_unix_fd = True
        self.unique_name = ":1.1"
        self.finalized = []

    def _finalize(self, err=None):
        self.finalized.append(err)


async def _burst(writer_class, count=3000, size=256):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.setblocking(False)
    loop = asyncio.get_running_loop()
    bus = _Bus(ours, loop)
    writer = writer_class(bus)
    sent = []
    futures = []
    r, w = os.pipe()
    try:
        for i in range(count):
            body = f"{i:08d}".encode() * (size // 8)
            msg = Message(path="/t", interface="t.T", member="S", signature="ay", body=[body],
                          serial=i + 1, unix_fds=[r] if i == count // 2 else [])
            sent.append(msg._marshall(negotiate_unix_fd=True))
            fut = loop.create_future()
            futures.append(fut)
            writer.schedule_write(msg, fut)
        received = bytearray()
        fds = []
        want = sum(len(m) for m in sent)
        while len(received) < want and not bus.finalized:
            await asyncio.sleep(0.001)          # a slow reader: the writer meets a full socket
            try:
                data, anc, _flags, _addr = theirs.recvmsg(65536, socket.CMSG_LEN(16), socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            received += data
            for _level, _type, payload in anc:
                fds.extend(array.array("i", payload[:len(payload) - len(payload) % 4]))
        return bus, bytes(received), b"".join(sent), futures, fds
    finally:
        for fd in (r, w):
            os.close(fd)
        ours.close()
        theirs.close()


def test_a_burst_larger_than_the_socket_buffer_arrives_whole_and_in_order():
    bus, received, sent, futures, fds = asyncio.run(_burst(_PatientWriter))
    assert bus.finalized == []
    assert received == sent                        # nothing lost, nothing reordered
    assert all(f.done() and f.exception() is None for f in futures)
    assert len(fds) == 1                           # the fd went with its message, once
    os.close(fds[0])


def test_dbus_nexts_own_writer_drops_the_connection_there():
    """The bug this guards: the library's writer finalizes the bus on EAGAIN."""
    bus, received, sent, _futures, fds = asyncio.run(_burst(_MessageWriter))
    for fd in fds:
        os.close(fd)
    if not bus.finalized:
        pytest.skip("this dbus-next writer waits for the socket itself")
    assert isinstance(bus.finalized[0], BlockingIOError)
    assert len(received) < len(sent)
