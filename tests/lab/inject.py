"""Sends UDP datagrams (hex, one per argument) to HOST:PORT: an attacker on the underlay.

    python3 inject.py HOST PORT HEX...
"""
import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for h in sys.argv[3:]:
    s.sendto(bytes.fromhex(h), (host, port))
