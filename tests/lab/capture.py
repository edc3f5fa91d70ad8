"""Captures raw frames on an interface (run inside the bridge's namespace) for N seconds.

    python3 capture.py IFACE SECONDS OUT

Writes every frame, length-prefixed (4 bytes big-endian), to OUT. Used by the overlay tests to
look at what crosses the underlay.
"""
import socket
import struct
import sys
import time

iface, seconds, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
# A large buffer (root may force past rmem_max) so a burst is not lost while Python writes.
s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
s.bind((iface, 0))
s.settimeout(0.2)
deadline = time.time() + seconds
with open(out, "wb") as f:
    print("capturing", flush=True)
    while time.time() < deadline:
        try:
            frame = s.recv(1 << 18)  # GSO frames can exceed 64 KiB
        except socket.timeout:
            continue
        f.write(struct.pack(">I", len(frame)) + frame)
