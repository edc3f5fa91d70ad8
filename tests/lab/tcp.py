"""A TCP transfer with its bytes checked.

    python3 tcp.py serve PORT              prints the SHA-256 of everything received, then exits
    python3 tcp.py send HOST PORT SIZE [MARKER]
                                           sends SIZE bytes (MARKER repeated, or random), prints
                                           their SHA-256
"""
import hashlib
import os
import socket
import sys

if sys.argv[1] == "serve":
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", int(sys.argv[2])))
    srv.listen(1)
    print("listening", flush=True)
    conn, _ = srv.accept()
    h = hashlib.sha256()
    total = 0
    while True:
        chunk = conn.recv(1 << 16)
        if not chunk:
            break
        h.update(chunk)
        total += len(chunk)
    print(total, h.hexdigest(), flush=True)
else:
    host, port, size = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    marker = sys.argv[5].encode() if len(sys.argv) > 5 else None
    h = hashlib.sha256()
    c = socket.create_connection((host, port), timeout=30)
    sent = 0
    while sent < size:
        n = min(1 << 16, size - sent)
        chunk = (marker * (n // len(marker) + 1))[:n] if marker else os.urandom(n)
        c.sendall(chunk)
        h.update(chunk)
        sent += n
    c.shutdown(socket.SHUT_WR)
    c.close()
    print(sent, h.hexdigest(), flush=True)
