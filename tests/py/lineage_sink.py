"""A stand-in OpenLineage endpoint: accepts POSTs, appends each body as one line to OUT and
each request's path and Authorization header to OUT.requests. Prints its port, then serves
until killed.

Usage: lineage_sink.py OUT
"""

import http.server
import json
import sys

OUT = sys.argv[1]


class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with open(OUT, "a") as f:
            f.write(json.dumps(json.loads(body)) + "\n")
        with open(OUT + ".requests", "a") as f:
            f.write(json.dumps({"path": self.path, "auth": self.headers.get("Authorization")}) + "\n")
        self.send_response(201)
        self.end_headers()

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", 0), Sink)
print(server.server_address[1], flush=True)
server.serve_forever()
