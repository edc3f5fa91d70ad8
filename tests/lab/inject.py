"""Sends UDP datagrams (hex, one per argument) to HOST:PORT: an attacker on the underlay.
With SOURCE_PORT set in the environment, sends from that port (a sender's own, once it stopped).

    [SOURCE_PORT=P] python3 inject.py HOST PORT HEX...
"""
import os
import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if os.environ.get("SOURCE_PORT"):
    s.bind(("0.0.0.0", int(os.environ["SOURCE_PORT"])))
for h in sys.argv[3:]:
    s.sendto(bytes.fromhex(h), (host, port))
