"""A tiny workload for the lab: answers every HTTP/1.1 request with one line naming itself and
the request ("api DELETE /v1/items/7").

    python3 http-echo.py PORT NAME
"""
import http.server
import sys

port, name = int(sys.argv[1]), sys.argv[2]


class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self):
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        body = f"{name} {self.command} {self.path}\n".encode()
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = answer

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("0.0.0.0", port), Echo).serve_forever()
