"""The test suite's own MCP server, for the faults real servers do not show on demand.

    python3 test_server.py stdio            MCP over stdin/stdout (one JSON-RPC message per line)
    python3 test_server.py http             streamable HTTP on 127.0.0.1 (a free port), printing
                                            "listening on http://127.0.0.1:PORT/mcp" once ready
    python3 test_server.py fail-start       writes to stderr and exits 3 before speaking MCP

Tools: `echo` (text back), `slow` (answers after `seconds`), `fail` (an error result),
`big` (a megabyte of text), `garble` (a line that is not JSON instead of its answer),
`crash` (the server exits at once), `env_var` (what the server's environment holds). Calls are answered on their own threads, so a slow
call does not hold back the others, as in any real server. Standard library only.
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROTOCOL_VERSION = "2025-06-18"


def schema(**properties):
    return {"type": "object", "properties": properties, "required": list(properties)}


TOOLS = [
    {"name": "echo", "description": "Says the text back.", "inputSchema": schema(text={"type": "string"})},
    {"name": "slow", "description": "Answers after a while.", "inputSchema": schema(seconds={"type": "number"})},
    {"name": "fail", "description": "Always fails.", "inputSchema": schema()},
    {"name": "big", "description": "A megabyte of text.", "inputSchema": schema()},
    {"name": "garble", "description": "Answers with a line that is not JSON.", "inputSchema": schema()},
    {"name": "crash", "description": "The server exits.", "inputSchema": schema()},
    {"name": "env_var", "description": "The value of an environment variable, or <unset>.",
     "inputSchema": schema(name={"type": "string"})},
]


class Garble(Exception):
    """The answer is to be a malformed line."""


def call_tool(name, arguments):
    """The `tools/call` result, or raises Garble; exits for `crash`."""
    text = lambda t: {"content": [{"type": "text", "text": t}]}
    if name == "echo":
        return text(str(arguments.get("text", "")))
    if name == "slow":
        time.sleep(float(arguments.get("seconds", 1)))
        return text("slept")
    if name == "fail":
        return {"content": [{"type": "text", "text": "the tool failed on purpose"}], "isError": True}
    if name == "big":
        return text("x" * 1_000_000)
    if name == "env_var":
        import os
        return text(os.environ.get(str(arguments.get("name")), "<unset>"))
    if name == "garble":
        raise Garble()
    if name == "crash":
        print("test server: crashing on purpose", file=sys.stderr, flush=True)
        sys.stderr.flush()
        import os
        os._exit(7)
    return None


def answer(message):
    """The response to one JSON-RPC message (None for notifications)."""
    if "id" not in message:
        return None
    method, params = message.get("method"), message.get("params") or {}
    reply = {"jsonrpc": "2.0", "id": message["id"]}
    if method == "initialize":
        reply["result"] = {"protocolVersion": PROTOCOL_VERSION, "capabilities": {"tools": {}},
                           "serverInfo": {"name": "fanout-test-server", "version": "1"}}
    elif method == "ping":
        reply["result"] = {}
    elif method == "tools/list":
        reply["result"] = {"tools": TOOLS}
    elif method == "tools/call":
        result = call_tool(params.get("name"), params.get("arguments") or {})
        if result is None:
            reply["error"] = {"code": -32602, "message": f"unknown tool: {params.get('name')}"}
        else:
            reply["result"] = result
    else:
        reply["error"] = {"code": -32601, "message": f"method not found: {method}"}
    return reply


def serve_stdio():
    lock = threading.Lock()

    def write(line):
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def handle(message):
        try:
            reply = answer(message)
        except Garble:
            write("{this is not json")
            return
        if reply is not None:
            write(json.dumps(reply))

    for line in sys.stdin:
        if line.strip():
            threading.Thread(target=handle, args=(json.loads(line),), daemon=True).start()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        message = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        try:
            reply = answer(message)
        except Garble:
            self.send(200, b"{this is not json", "application/json")
            return
        if reply is None:
            self.send(202, b"", None)
        else:
            self.send(200, json.dumps(reply).encode(), "application/json")

    def do_GET(self):
        # No server-initiated stream: the specification allows 405 here.
        self.send(405, b"", None)

    def do_DELETE(self):
        self.send(200, b"", None)

    def send(self, status, body, content_type):
        self.send_response(status)
        if content_type:
            self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve_http():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"listening on http://127.0.0.1:{server.server_address[1]}/mcp", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "stdio"
    if mode == "fail-start":
        print("test server: cannot open the database (on purpose)", file=sys.stderr, flush=True)
        sys.exit(3)
    serve_http() if mode == "http" else serve_stdio()
