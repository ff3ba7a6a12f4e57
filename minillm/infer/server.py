"""`minillm serve`: an HTTP server for a trained (or quantized) model.

    GET  /                 the chat page (chat.html: one file, no external assets)
    GET  /health           {"status": "ok" | "draining", load, limits, model}
    POST /v1/completions   {"prompt": "...", "max_tokens": 64, "temperature": 0.8, "top_k": null,
                            "top_p": null, "stop": ["\\n\\n"], "seed": null} -> {"text", "tokens",
                            "finish_reason", "usage"}
    POST /v1/stream        the same body; server-sent events, one ``data: {"token", "text"}`` per
                           token, then ``event: done`` with the finish reason and timings

Errors are JSON ``{"error": "..."}``: 400 bad JSON or parameters (over-long prompt, too many
tokens asked), 404, 429 too many requests in flight, 503 shutting down. SIGTERM (or Ctrl-C)
drains: new requests get 503, admitted ones finish (up to --drain-timeout), then exit 0.

Why the standard library's ThreadingHTTPServer: it is maintained with CPython, needs no
dependency, and is enough here, because handler threads only parse requests and wait on queues
while one scheduler thread (scheduler.py) runs the model; a thread per connection is cheap at the
tens of connections one model process can serve. It speaks HTTP/1.0 (a streamed response ends
when the connection closes, which is what SSE needs) and has no TLS: bind it to loopback or put a
reverse proxy in front of it for anything public.
"""
import errno
import json
import queue
import select
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from minillm.errors import UserError
from minillm.infer.generate import SamplingParams, Sequence
from minillm.infer.scheduler import Busy, Draining, Scheduler
from minillm.perf.allocator import tune_host_allocator

MAX_BODY = 1 << 20


class BadRequest(Exception):
    """A request the client must fix (HTTP 400)."""


class Service:
    """What the handlers share: the scheduler, the tokenizer, the limits, the model's name."""

    def __init__(self, scheduler, tokenizer, block_size, max_prompt_tokens, max_new_tokens, info):
        self.scheduler, self.tokenizer = scheduler, tokenizer
        self.block_size = block_size
        self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens
        self.info = info
        self.inflight = 0
        self.lock = threading.Lock()

    def parse(self, body):
        """A Sequence from a request body, or BadRequest saying what to change."""
        try:
            req = json.loads(body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not valid JSON ({e})") from None
        if not isinstance(req, dict):
            raise BadRequest("the body must be a JSON object like {\"prompt\": \"...\"}")
        unknown = sorted(set(req) - {"prompt", "max_tokens", "temperature", "top_k", "top_p", "stop", "seed"})
        if unknown:
            raise BadRequest(f"unknown field {unknown[0]!r}; fields: prompt, max_tokens, temperature, "
                             f"top_k, top_p, stop, seed")
        prompt = req.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("\"prompt\" must be a non-empty string")
        max_tokens = _field(req, "max_tokens", int, 64)
        if not 1 <= max_tokens <= self.max_new_tokens:
            raise BadRequest(f"\"max_tokens\"={max_tokens} must be between 1 and {self.max_new_tokens}")
        stop = req.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise BadRequest("\"stop\" must be a string or a list of at most 4 strings")
        try:
            ids = self.tokenizer.encode(prompt)
        except UserError as e:
            raise BadRequest(f"cannot tokenize the prompt: {e}") from None
        if len(ids) > self.max_prompt_tokens:
            raise BadRequest(f"the prompt is {len(ids)} tokens long; the limit is "
                             f"{self.max_prompt_tokens} (shorten it)")
        if not ids:
            raise BadRequest("the prompt encodes to no tokens")
        try:
            params = SamplingParams(max_tokens, _field(req, "temperature", float, 0.8),
                                    _field(req, "top_k", int, None), _field(req, "top_p", float, None),
                                    _field(req, "seed", int, None), tuple(stop))
        except ValueError as e:
            raise BadRequest(str(e)) from None
        return Sequence(ids, params, self.tokenizer.decode)


def _field(req, name, kind, default):
    v = req.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise BadRequest(f"\"{name}\" must be a{'n integer' if kind is int else ' number'}, got {v!r}")
    return kind(v)


class Handler(BaseHTTPRequestHandler):
    server_version = "minillm"
    service: Service = None  # set on the subclass made by make_server

    def log_message(self, fmt, *args):  # one line per request on stderr, without the date
        sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    # ------------------------------------------------------------------ responses
    def _json(self, code, obj, headers=()):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code, message, headers=()):
        self._json(code, {"error": message}, headers)

    def do_GET(self):
        if self.path in ("/", "/index.html"):
            page = resources.files("minillm.infer").joinpath("chat.html").read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
        elif self.path == "/health":
            load = self.service.scheduler.load()
            self._json(200, {"status": "draining" if load["draining"] else "ok", **load,
                             **self.service.info})
        else:
            self._error(404, f"no page {self.path}; try /, /health, POST /v1/completions or /v1/stream")

    def do_POST(self):
        if self.path not in ("/v1/completions", "/v1/stream"):
            return self._error(404, f"no endpoint {self.path}; POST /v1/completions or /v1/stream")
        svc = self.service
        try:
            try:
                n = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise BadRequest("the Content-Length header is not a number") from None
            if not 0 <= n <= MAX_BODY:
                raise BadRequest(f"the body is {n} bytes; send 1 to {MAX_BODY} bytes of JSON")
            seq = svc.parse(self.rfile.read(n))
            req = svc.scheduler.submit(seq)
        except BadRequest as e:
            return self._error(400, str(e))
        except Busy as e:
            return self._error(429, str(e), [("Retry-After", "1")])
        except Draining as e:
            return self._error(503, str(e))
        with svc.lock:
            svc.inflight += 1
        try:
            (self._stream if self.path == "/v1/stream" else self._complete)(req)
        except (BrokenPipeError, ConnectionResetError):  # the client left: free its row
            req.cancel()
            svc.scheduler.wake()
        finally:
            with svc.lock:
                svc.inflight -= 1

    def _events(self, req):
        """The request's events; cancels it (and stops) when the client disconnects, which is
        checked every 0.2 s whether or not tokens are flowing."""
        checked = time.monotonic()
        while True:
            try:
                ev = req.events.get(timeout=0.2)
            except queue.Empty:
                ev = None
            if time.monotonic() - checked > 0.2:
                checked = time.monotonic()
                if self._client_gone():
                    req.cancel()
                    self.service.scheduler.wake()
                    return
            if ev is None:
                continue
            yield ev
            if ev[0] != "token":
                return

    def _client_gone(self):
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _complete(self, req):
        tokens, end = [], ("done", "cancelled")
        for ev in self._events(req):
            if ev[0] == "token":
                tokens.append(ev[1])
            else:
                end = ev
        if end[0] == "error":
            return self._error(500, f"generation failed: {end[1]}")
        if req.cancelled.is_set():
            return
        self._json(200, {"text": req.seq.text, "tokens": tokens, "finish_reason": end[1],
                         "usage": req.stats()})

    def _stream(self, req):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        for ev in self._events(req):
            if ev[0] == "token":
                self._send_event({"token": ev[1], "text": ev[2]})
            elif ev[0] == "error":
                self._send_event({"error": f"generation failed: {ev[1]}"}, "error")
            else:
                self._send_event({"finish_reason": ev[1], "text": req.seq.text, "usage": req.stats()},
                                 "done")

    def _send_event(self, obj, event=None):
        head = f"event: {event}\n" if event else ""
        self.wfile.write(f"{head}data: {json.dumps(obj)}\n\n".encode())
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: a burst of more simultaneous connections
    # overflows it and the kernel resets some. Admission is decided by the scheduler (429), so
    # the backlog only has to hold a burst.
    request_queue_size = 128
    daemon_threads = True


def make_server(host, port):
    """A bound Server (not yet serving); a port in use is a UserError. Its handler class gets its
    ``service`` before serving starts."""
    handler = type("BoundHandler", (Handler,), {})
    try:
        server = Server((host, port), handler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use; pass another --port "
                            f"(or stop the server using it)") from None
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return server


def serve_command(args):
    """Run the server until SIGTERM / Ctrl-C, then drain and return 0."""
    from minillm.train.inference import load_model, load_run_tokenizer
    if args.max_queue < 0:
        raise UserError(f"--max-queue={args.max_queue} must be >= 0")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port={args.port} must be between 0 and 65535")
    stop = threading.Event()
    # Handlers first, so a SIGTERM that arrives during loading is not lost.
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    server = make_server(args.host, args.port)  # a port in use fails before the model loads
    tune_host_allocator()  # decoding makes the same temporaries every step: reuse their memory
    model, cfg, ckpt = load_model(args.path, args.device)
    tokenizer = load_run_tokenizer(ckpt, cfg)
    bs = cfg.model.block_size
    max_prompt = args.max_prompt_tokens or bs
    bits = next((m.qweight.bits for _, m in model.named_modules() if hasattr(m, "qweight")), None)
    info = {"model": str(ckpt), "block_size": bs, "vocab_size": cfg.model.vocab_size,
            "quantized_bits": bits, "max_prompt_tokens": max_prompt, "max_new_tokens": args.max_new_tokens}
    scheduler = Scheduler(model, args.max_batch, args.max_queue, tokenizer.vocab_size)
    server.RequestHandlerClass.service = Service(scheduler, tokenizer, bs, max_prompt,
                                                 args.max_new_tokens, info)
    service = server.RequestHandlerClass.service
    scheduler.start()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    print(f"serving {ckpt} at http://{host}:{port}/ (batch {args.max_batch}, queue "
          f"{args.max_queue}); SIGTERM or Ctrl-C drains and stops", flush=True)
    while not stop.wait(0.5):
        pass
    load = scheduler.load()
    print(f"draining: {load['active']} decoding, {load['waiting']} waiting", flush=True)
    cancelled = scheduler.drain(args.drain_timeout)
    deadline = time.monotonic() + 5
    while service.inflight and time.monotonic() < deadline:  # responses still being written
        time.sleep(0.05)
    server.shutdown()
    server.server_close()
    print(f"stopped ({cancelled} requests cancelled at the drain timeout)", flush=True)
    return 0
