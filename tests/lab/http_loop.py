"""Sends GET requests on ONE keep-alive HTTP/1.1 connection, one every 50 ms, for N seconds.

    python3 http_loop.py HOST PORT PATH SECONDS

Prints "ready", then per request: unix time, status, and "same" while the connection is the
first one ("new" if it had to reconnect). Used to show a policy change applies to the next
request without dropping the connection.
"""
import http.client
import sys
import time

host, port, path, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
conn = http.client.HTTPConnection(host, port, timeout=5)
conn.connect()
first = conn.sock
print("ready", flush=True)
end = time.time() + seconds
while time.time() < end:
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    print(f"{time.time():.3f} {response.status} {'same' if conn.sock is first else 'new'}", flush=True)
    time.sleep(0.05)
