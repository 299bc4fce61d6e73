"""A stand-in for Slack and webhook receivers in tests.

Usage: http_receiver.py PORT LOG [PATH=STATUS,STATUS,...]...
Every POST is appended to LOG as one JSON line (path, headers, body, the status answered). A path
answers the listed statuses in turn, then 200.
"""
import http.server
import json
import sys
import threading

port = int(sys.argv[1])
log = sys.argv[2]
plan = {}
for spec in sys.argv[3:]:
    path, codes = spec.split("=", 1)
    plan[path] = [int(code) for code in codes.split(",")]
lock = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with lock:
            codes = plan.get(self.path, [])
            status = codes.pop(0) if codes else 200
            with open(log, "a", encoding="utf-8") as out:
                record = {
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body.decode("utf-8", "replace"),
                    "status": status,
                }
                out.write(json.dumps(record) + "\n")
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
