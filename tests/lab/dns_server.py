"""A DNS server answering A queries from a file, read again for every query.

    python3 dns_server.py ADDRESS ZONEFILE

ZONEFILE holds lines "NAME ADDRESS" (NAME without the trailing dot); every answer has a TTL of
1 s, a name not in the file gets NXDOMAIN. Prints "listening". Used by the egress tests to
change what a name resolves to.
"""
import socket
import struct
import sys

address, zonefile = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((address, 53))
print("listening", flush=True)


def records():
    table = {}
    with open(zonefile) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2:
                table.setdefault(parts[0].lower(), []).append(parts[1])
    return table


while True:
    query, peer = s.recvfrom(512)
    if len(query) < 12:
        continue
    ident, flags, qdcount = struct.unpack(">HHH", query[:6])
    labels, i = [], 12
    while i < len(query) and query[i] != 0:
        n = query[i]
        labels.append(query[i + 1 : i + 1 + n].decode(errors="replace"))
        i += 1 + n
    question = query[12 : i + 5]
    qtype = struct.unpack(">H", query[i + 1 : i + 3])[0] if i + 3 <= len(query) else 0
    name = ".".join(labels).lower()
    answers = records().get(name)
    rd = flags & 0x0100
    if answers is None:
        s.sendto(struct.pack(">HHHHHH", ident, 0x8183 | rd, 1, 0, 0, 0) + question, peer)
        continue
    body = b""
    count = 0
    if qtype in (1, 255):
        for a in answers:
            body += struct.pack(">HHHIH", 0xC00C, 1, 1, 1, 4) + socket.inet_aton(a)
            count += 1
    s.sendto(struct.pack(">HHHHHH", ident, 0x8180 | rd, 1, count, 0, 0) + question + body, peer)
