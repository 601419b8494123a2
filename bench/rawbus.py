#!/usr/bin/env python3
"""One GetManagedObjects on a raw socket: what the bus itself takes, with no client library.

Connects to the bus at ADDRESS (``unix:path=...``), authenticates (EXTERNAL), says
Hello, then sends ``GetManagedObjects`` to org.vfiod1 and reads until the whole
reply is in; prints, as JSON, the seconds from sending the call to the last byte of
its reply and the reply's size.  Nothing is unmarshalled: the time is the
daemon's and the bus's, not a client library's.

    python bench/rawbus.py ADDRESS [CALLS]
"""

import json
import os
import socket
import struct
import sys
import time

from dbus_next import Message


def read_message(sock, buf):
    """One whole message off `sock` (after what `buf` holds); (message bytes, rest)."""
    while len(buf) < 16:
        buf += sock.recv(1 << 16)
    order = "<" if buf[0:1] == b"l" else ">"
    body_len, _serial, fields_len = struct.unpack_from(order + "III", buf, 4)
    total = 16 + fields_len + (-fields_len % 8) + body_len
    while len(buf) < total:
        chunk = sock.recv(max(1 << 20, total - len(buf)))
        if not chunk:
            raise EOFError("the bus closed the connection")
        buf += chunk
    return buf[:total], buf[total:]


def reply_serial(data):
    """The REPLY_SERIAL header field of a message, or None (a signal)."""
    order = "<" if data[0:1] == b"l" else ">"
    (fields_len,) = struct.unpack_from(order + "I", data, 12)
    pos, end = 16, 16 + fields_len
    while pos < end:
        code, sig_len = data[pos], data[pos + 1]
        sig = data[pos + 2:pos + 2 + sig_len].decode()
        pos += 3 + sig_len
        size = {"u": 4, "y": 1}.get(sig)
        if sig in ("s", "o"):
            pos += -pos % 4
            (n,) = struct.unpack_from(order + "I", data, pos)
            value_end = pos + 4 + n + 1
        elif sig == "g":
            value_end = pos + 1 + data[pos] + 1
        else:
            pos += -pos % size
            value_end = pos + size
        if code == 5:
            return struct.unpack_from(order + "I", data, pos)[0]
        pos = value_end + (-value_end % 8)
    return None


def main():
    address, calls = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address.split("path=", 1)[1].split(",")[0])
    sock.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
    if not sock.recv(4096).startswith(b"OK"):
        raise SystemExit("the bus refused the authentication")
    sock.sendall(b"BEGIN\r\n")
    hello = Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                    interface="org.freedesktop.DBus", member="Hello", serial=1)
    sock.sendall(hello._marshall())
    buf = b""
    while True:
        msg, buf = read_message(sock, buf)
        if reply_serial(msg) == 1:
            break
    out = []
    for serial in range(2, 2 + calls):
        call = Message(destination="org.vfiod1", path="/org/vfiod1", interface="org.freedesktop.DBus.ObjectManager",
                       member="GetManagedObjects", serial=serial)
        t0 = time.perf_counter()
        sock.sendall(call._marshall())
        while True:
            msg, buf = read_message(sock, buf)
            if reply_serial(msg) == serial:
                break
        out.append({"seconds": time.perf_counter() - t0, "bytes": len(msg), "error": msg[1] == 3})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
