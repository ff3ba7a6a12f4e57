"""Helpers for tests of `minillm serve`: start a real server process on a free loopback port (the
server picks it: --port 0, and prints its address), talk to it over real HTTP, stop it."""
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

from conftest import minillm_env


class Server:
    def __init__(self, path, *args, cwd):
        self.proc = subprocess.Popen([sys.executable, "-m", "minillm", "serve", str(path),
                                      "--port", "0", *map(str, args)], cwd=cwd, env=minillm_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # "serving CKPT at http://127.0.0.1:PORT/ ..."
        m = re.search(r"http://([\d.]+):(\d+)/", line)
        if not m:
            self.proc.kill()
            raise AssertionError(f"server did not start: {line!r} {self.proc.stderr.read()}")
        self.url = m.group(0)
        self.host, self.port = m.group(1), int(m.group(2))

    def conn(self, timeout=60):
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, method, path, body=None, timeout=60):
        """(status, decoded JSON or text) of one request."""
        c = self.conn(timeout)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        c.request(method, path, body=data, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        raw = r.read().decode()
        c.close()
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, raw

    def open_stream(self, body, timeout=60):
        """(connection, response) of a POST /v1/stream whose events are read with read_event."""
        c = self.conn(timeout)
        c.request("POST", "/v1/stream", body=json.dumps(body).encode(),
                  headers={"Content-Type": "application/json"})
        return c, c.getresponse()

    def raw_post(self, path, body):
        """A plain socket that has sent POST path with a JSON body (for clients that vanish)."""
        s = socket.create_connection((self.host, self.port), timeout=60)
        data = json.dumps(body).encode()
        s.sendall(b"POST %s HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n%s"
                  % (path.encode(), len(data), data))
        return s

    def health(self):
        return self.request("GET", "/health")[1]

    def wait_health(self, predicate, timeout=30):
        """Poll /health until predicate(health) holds; the last health (AssertionError on timeout)."""
        end = time.monotonic() + timeout
        while True:
            h = self.health()
            if predicate(h):
                return h
            if time.monotonic() > end:
                raise AssertionError(f"server health never reached the expected state: {h}")
            time.sleep(0.05)

    def terminate(self, timeout=60):
        """SIGTERM; (exit code, stdout, stderr) once it exits."""
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def read_event(resp):
    """The next server-sent event of a streaming response: (name, data dict), or None at the end."""
    name, data = "message", None
    while True:
        line = resp.fp.readline()
        if not line:
            return None
        line = line.decode().rstrip("\n")
        if not line:
            if data is not None:
                return name, json.loads(data)
            continue
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()
