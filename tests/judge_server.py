"""A scripted OpenAI-compatible judge endpoint on 127.0.0.1 for tests: each POST gets the next
(status, reply) of its script, the last one repeating; every request's body is recorded."""
from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@contextlib.contextmanager
def scripted_judge(script: list[tuple[int, str]]):
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            status, reply = script[min(len(seen), len(script)) - 1]
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]} if status == 200
                              else {"error": {"message": reply}}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status == 429:
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    finally:
        server.shutdown()
        server.server_close()
