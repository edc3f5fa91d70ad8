"""UDP flows: an echo server, a flood of distinct flows, and a slow conversation timed.

    python3 flows.py echo PORT             answers every datagram with itself; prints "listening"
    python3 flows.py flood HOST COUNT      sends one datagram on each of COUNT distinct flows to
                                           HOST (source port x destination port), paced, then
                                           prints COUNT and the seconds it took
    python3 flows.py converse HOST PORT PAUSE STOPFILE
                                           on one UDP flow, until STOPFILE exists and three times
                                           more: a datagram to HOST:PORT, its echo awaited for
                                           1 s, then PAUSE seconds of silence; prints "ready"
                                           after the first answer, then JSON {"sent",
                                           "answered", "rtt_ms"} counted from it
"""
import json
import socket
import sys
import time

mode = sys.argv[1]
if mode == "echo":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(sys.argv[2])))
    print("listening", flush=True)
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(data, peer)
elif mode == "flood":
    host, count = sys.argv[2], int(sys.argv[3])
    # 20,000 destination ports per source socket: COUNT / 20,000 sockets.
    per_socket = 20000
    sockets = []
    start = time.monotonic()
    sent = 0
    while sent < count:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", 0))
        sockets.append(s)
        for port in range(20000, 20000 + min(per_socket, count - sent)):
            try:
                s.sendto(b"f", (host, port))
            except OSError:
                # A full queue (ENOBUFS): a moment, then once more.
                time.sleep(0.0005)
                try:
                    s.sendto(b"f", (host, port))
                except OSError:
                    pass
            sent += 1
            if sent % 200 == 0:
                # Paced (at most ~20,000 a second here) so that the tun device's queue, not
                # meshd, is never what drops them.
                time.sleep(0.01)
    print(sent, round(time.monotonic() - start, 2), flush=True)
elif mode == "converse":
    import os

    host, port, pause, stop = sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    answered, rtts, i, after_stop, first = 0, [], 0, 0, None
    while after_stop < 3:
        if first is not None and os.path.exists(stop):
            after_stop += 1
        i += 1
        payload = b"probe %d" % i
        sent_at = time.monotonic()
        s.sendto(payload, (host, port))
        deadline = sent_at + 1.0
        while True:
            try:
                s.settimeout(max(0.001, deadline - time.monotonic()))
                data, _ = s.recvfrom(2048)
            except (socket.timeout, ConnectionRefusedError):
                break
            if data == payload:
                answered += 1
                rtts.append(round((time.monotonic() - sent_at) * 1000, 3))
                if first is None:
                    first = i
                    print("ready", flush=True)
                break
        time.sleep(pause)
    # Counted from the first answer on.
    print(json.dumps({"sent": i - first + 1, "answered": answered, "rtt_ms": rtts}), flush=True)
