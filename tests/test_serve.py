"""`minillm serve` under real HTTP: a real server process on a free loopback port, real sockets.

Completion and streaming (equal to the library's greedy generation), bad requests (400 with a
message), too many requests (429), a client that disconnects mid-stream (its row is freed), SIGTERM
(admitted requests finish, new ones get 503, exit 0), and bad command lines (one line, exit 2).
"""
import json
import signal
import socket
import threading
import time

import pytest
from serve_util import Server, read_event
from test_cli import assert_user_error

BIG = 100_000  # tokens: a request that runs until its client goes away


@pytest.fixture(scope="module")
def server(tiny_run):
    s = Server(tiny_run, "--max-batch", 2, "--max-queue", 1, "--max-new-tokens", BIG,
               cwd=tiny_run.parent)
    yield s
    s.kill()


@pytest.fixture(scope="module")
def greedy(tiny_run):
    """The library's own greedy continuation of a prompt (what the server must return)."""
    from minillm.infer.generate import generate
    from minillm.train.inference import load_model, load_run_tokenizer
    model, cfg, ckpt = load_model(tiny_run)
    tok = load_run_tokenizer(ckpt, cfg)
    return lambda prompt, n: generate(model, [prompt], n, temperature=0, tokenizer=tok)[0]


def test_completion_equals_library_generation(server, greedy):
    status, r = server.request("POST", "/v1/completions",
                               {"prompt": "def f(x):", "max_tokens": 40, "temperature": 0})
    assert status == 200, r
    want = greedy("def f(x):", 40)
    assert r["tokens"] == want.tokens and r["text"] == want.text
    assert r["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 40
    assert r["usage"]["prompt_tokens"] == len("def f(x):")   # a char model: one token per char


def test_stream_sends_one_event_per_token(server, greedy):
    conn, resp = server.open_stream({"prompt": "The ", "max_tokens": 25, "temperature": 0})
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    events = []
    while (ev := read_event(resp)) is not None:
        events.append(ev)
    conn.close()
    tokens = [d for name, d in events if name == "message"]
    (name, done), = [e for e in events if e[0] != "message"]
    assert name == "done" and events[-1][0] == "done" and len(tokens) == 25
    want = greedy("The ", 25)
    assert [t["token"] for t in tokens] == want.tokens
    assert "".join(t["text"] for t in tokens) == done["text"] == want.text
    assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 25


def test_stop_string_ends_the_completion(server, greedy):
    full = greedy("def ", 30).text
    stop = full[5:7]  # two characters the model is sure to write
    status, r = server.request("POST", "/v1/completions",
                               {"prompt": "def ", "max_tokens": 30, "temperature": 0, "stop": [stop]})
    assert status == 200 and r["finish_reason"] == "stop", r
    assert r["text"] == full[:full.index(stop)]


@pytest.mark.parametrize("body, needle", [
    (b'{"prompt": "def', "not valid JSON"),
    (b'["def"]', "JSON object"),
    (b'{"prompt": ""}', "non-empty"),
    (b'{"prompt": "x", "max_tokens": 0}', "max_tokens"),
    (b'{"prompt": "x", "temperature": "hot"}', "temperature"),
    (b'{"prompt": "x", "top_p": 1.5}', "top_p"),
    (b'{"prompt": "x", "tokens": 3}', "unknown field 'tokens'"),
    (json.dumps({"prompt": "a" * 17}).encode(), "limit is 16"),   # block_size 16
    (json.dumps({"prompt": "\u65e5"}).encode(), "tokenize"),
], ids=["bad-json", "not-object", "empty", "max-tokens", "temperature", "top-p", "unknown",
        "too-long", "not-in-vocab"])
def test_bad_requests_get_400_with_a_message(server, body, needle):
    for path in ("/v1/completions", "/v1/stream"):
        status, r = server.request("POST", path, body)
        assert status == 400 and needle in r["error"], (path, r)
    assert server.request("GET", "/nope")[0] == 404
    assert server.health()["status"] == "ok"  # and the server goes on


def test_too_many_requests_429_then_disconnects_free_the_rows(server):
    """Batch 2 + queue 1: a 4th request is refused with 429; closing the three clients frees
    everything, and the server serves again."""
    streams = [server.open_stream({"prompt": "ab", "max_tokens": BIG}) for _ in range(3)]
    h = server.wait_health(lambda h: h["active"] == 2 and h["waiting"] == 1)
    status, r = server.request("POST", "/v1/completions", {"prompt": "ab", "max_tokens": 5})
    assert status == 429 and "busy" in r["error"], r
    for conn, resp in streams:
        resp.close()
        conn.close()
    h = server.wait_health(lambda h: h["active"] == 0 and h["waiting"] == 0)
    assert h["status"] == "ok"
    status, r = server.request("POST", "/v1/completions", {"prompt": "ab", "max_tokens": 5})
    assert status == 200 and len(r["tokens"]) == 5


def test_a_burst_of_connections_gets_answers_not_resets(server):
    """32 clients connect at the same moment while the server is busy decoding (socketserver's
    default listen backlog of 5 made the kernel reset some of them): each gets a whole HTTP
    answer, 429 for all but the one that fits the queue (batch 2 + queue 1)."""
    start, replies = threading.Barrier(32), []

    def one():
        start.wait()
        try:
            s = server.raw_post("/v1/completions", {"prompt": "ab", "max_tokens": 20})
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
            s.close()
            head, _, body = reply.partition(b"\r\n\r\n")
            replies.append((int(head.split()[1]), json.loads(body)))
        except OSError as e:
            replies.append((type(e).__name__, None))

    busy = [server.raw_post("/v1/stream", {"prompt": "ab", "max_tokens": BIG}) for _ in range(2)]
    server.wait_health(lambda h: h["active"] == 2)  # the model thread is busy decoding meanwhile
    threads = [threading.Thread(target=one) for _ in range(32)]
    for t in threads:
        t.start()
    while len(replies) < 31:  # all but the queued one are answered at once
        time.sleep(0.05)
    for s in busy:            # then the busy rows free up and the queued request runs
        s.close()
    for t in threads:
        t.join()
    codes = [code for code, _ in replies]
    assert sorted(codes, key=str) == [200] + [429] * 31, codes
    server.wait_health(lambda h: h["active"] == 0 and h["waiting"] == 0)


def test_client_disconnect_mid_stream_frees_its_row(server):
    for path in ("/v1/stream", "/v1/completions"):
        s = server.raw_post(path, {"prompt": "x = ", "max_tokens": BIG})
        if path == "/v1/stream":
            got = b""
            while got.count(b"data:") < 5:  # the stream is flowing
                got += s.recv(4096)
        server.wait_health(lambda h: h["active"] == 1)
        s.shutdown(socket.SHUT_RDWR)  # the client goes away in the middle
        s.close()
        server.wait_health(lambda h: h["active"] == 0)


def test_sigterm_drains_admitted_requests_and_exits_0(tiny_run):
    """One request decoding and one queued behind it (batch 1) when SIGTERM arrives: a new request
    gets 503, both admitted ones run to their last token, then the server exits 0. (2 x 1500
    tokens keep the drain open for seconds, so the 503 check is not a race.)"""
    s = Server(tiny_run, "--max-batch", 1, "--max-new-tokens", 1500, cwd=tiny_run.parent)
    try:
        body = {"prompt": "def ", "max_tokens": 1500, "temperature": 0}
        streams = [s.open_stream(body) for _ in range(2)]
        assert read_event(streams[0][1])[0] == "message"              # decoding
        s.wait_health(lambda h: h["active"] == 1 and h["waiting"] == 1)
        s.proc.send_signal(signal.SIGTERM)
        s.wait_health(lambda h: h["status"] == "draining")
        status, r = s.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 3})
        assert status == 503 and "shutting down" in r["error"]
        for i, (conn, resp) in enumerate(streams):
            events = []
            while (ev := read_event(resp)) is not None:
                events.append(ev)
            assert events[-1][0] == "done" and events[-1][1]["finish_reason"] == "length"
            assert sum(e[0] == "message" for e in events) == 1500 - (i == 0)  # one read above
        code, out, err = s.terminate()
        assert code == 0, err
        assert "draining: 1 decoding, 1 waiting" in out and "stopped (0 requests cancelled" in out
    finally:
        s.kill()


def test_port_in_use_is_one_line_exit_2(tiny_run, minillm_cli):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = minillm_cli("serve", tiny_run, "--port", port, cwd=tiny_run.parent, timeout=60)
    assert_user_error(r, f"port {port}", "in use", "--port")


def test_serving_something_that_is_not_a_model_is_one_line_exit_2(tiny_run, minillm_cli):
    r = minillm_cli("serve", tiny_run / "metrics.jsonl", "--port", 0, cwd=tiny_run.parent)
    assert_user_error(r, "metrics.jsonl", "not an HDF5 file")
    r = minillm_cli("serve", tiny_run, "--port", 0, "--max-batch", 0, cwd=tiny_run.parent)
    assert_user_error(r, "--max-batch: must be >= 1, got 0")
