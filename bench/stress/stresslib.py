"""Shared helpers for the stress scripts in this folder (standard library only).

- Exporter: starts kissbot-exporter in a fresh temporary directory (its own
  Unix socket, SQLite file and an ephemeral 127.0.0.1 HTTP port), waits until
  GET /metrics answers 200, and stops it by pid with SIGTERM, timing the exit.
- proc_status(): VmRSS and Threads of a pid, from /proc/PID/status.
- http_get(): one plain HTTP/1.1 GET over a fresh loopback connection.
- machine_facts(): nproc, memory, load and concurrent cargo/rustc processes,
  so that a figure can be read against how busy the machine was.

Nothing here touches a process it did not start: the exporter is signalled
by the pid Popen returned, and nothing else is ever killed.
"""

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

LISTEN_RE = re.compile(r"http server listening address=(\S+)")


def proc_status(pid):
    """(rss_bytes, threads) of a live pid, or (None, None) once it is gone."""
    rss = threads = None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return rss, threads


def mib(n):
    """Bytes to MiB, rounded to 0.1 (None stays None)."""
    return None if n is None else round(n / 1048576, 1)


def percentile(values, p):
    """Nearest-rank percentile of a list (None for an empty list)."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def http_get(addr, path, timeout=5.0, headers=None):
    """GET path from addr ("127.0.0.1:PORT") on a new connection.

    Returns (status, body_bytes, seconds). Raises OSError/socket.timeout on
    failure. Reads by Content-Length (the exporter always sends one), else
    until the peer closes.
    """
    host, port = addr.rsplit(":", 1)
    start = time.monotonic()
    deadline = start + timeout
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\r\n".encode())
        buf = bytearray()
        head_end = -1
        length = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("deadline")
            s.settimeout(left)
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
            if head_end < 0:
                head_end = buf.find(b"\r\n\r\n")
                if head_end >= 0:
                    for line in bytes(buf[:head_end]).split(b"\r\n")[1:]:
                        k, _, v = line.partition(b":")
                        if k.strip().lower() == b"content-length":
                            length = int(v.strip())
            if head_end >= 0 and length is not None and len(buf) - head_end - 4 >= length:
                break
        if head_end < 0:
            raise OSError("no complete response head")
        status = int(bytes(buf[:head_end]).split(b" ", 2)[1])
        return status, bytes(buf[head_end + 4:]), time.monotonic() - start


def machine_facts():
    """Facts that qualify every figure: cores, memory, load, other builds."""
    mem = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            mem[k] = int(v.split()[0]) * 1024
    busy = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    if f.read().strip() in ("cargo", "rustc"):
                        busy += 1
            except OSError:
                pass
    return {
        "nproc": os.cpu_count(),
        "mem_total_mib": mib(mem.get("MemTotal")),
        "mem_available_mib": mib(mem.get("MemAvailable")),
        "loadavg": open("/proc/loadavg").read().split()[:3],
        "cargo_rustc_processes": busy,
        "own_nice": os.nice(0),
    }


class Sampler(threading.Thread):
    """Samples RSS and thread count of a pid every `interval` seconds."""

    def __init__(self, pid, interval, stop_event):
        super().__init__(daemon=True)
        self.pid, self.interval, self.stop_event = pid, interval, stop_event
        self.samples = []  # (t, rss_bytes, threads)

    def run(self):
        t0 = time.monotonic()
        while not self.stop_event.is_set():
            rss, thr = proc_status(self.pid)
            if rss is not None:
                self.samples.append((round(time.monotonic() - t0, 2), rss, thr))
            self.stop_event.wait(self.interval)

    def peak_rss(self):
        return max((s[1] for s in self.samples), default=None)

    def peak_threads(self):
        return max((s[2] for s in self.samples), default=None)


class Exporter:
    """A kissbot-exporter started in its own temporary directory.

    Use as a context manager; __exit__ SIGKILLs the pid if it still runs and
    removes the directory (unless keep_dir).
    """

    def __init__(self, binary, extra_args=(), db_file=None, startup_timeout=600, keep_dir=False):
        self.binary = os.path.abspath(binary)
        self.extra_args = list(extra_args)
        self.dir = tempfile.mkdtemp(prefix="kissbot-stress-")
        self.socket_path = os.path.join(self.dir, "kissbot.sock")
        self.db_path = os.path.join(self.dir, "kissbot.db")
        self.log_path = os.path.join(self.dir, "exporter.log")
        self.startup_timeout = startup_timeout
        self.keep_dir = keep_dir
        if db_file:
            shutil.copyfile(db_file, self.db_path)
        self.proc = None
        self.addr = None
        self.startup_s = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()  # by pid, the process we started
            self.proc.wait()
        if not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def pid(self):
        return self.proc.pid

    def start(self):
        args = [
            self.binary,
            f"--socket.path={self.socket_path}",
            f"--db.path={self.db_path}",
            "--web.listen-address=127.0.0.1:0",
            "--log.level=info",
        ] + self.extra_args
        self.command = args
        self.log = open(self.log_path, "wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir)
        deadline = t0 + self.startup_timeout
        while self.addr is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exporter exited with {self.proc.returncode}: {self.tail_log()}")
            if time.monotonic() > deadline:
                raise RuntimeError("exporter did not log its HTTP address in time")
            m = LISTEN_RE.search(open(self.log_path, errors="replace").read())
            if m:
                self.addr = m.group(1)
            else:
                time.sleep(0.1)
        while True:
            try:
                status, _, _ = http_get(self.addr, "/metrics", timeout=5)
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("GET /metrics never answered 200")
            time.sleep(0.1)
        self.startup_s = round(time.monotonic() - t0, 2)

    def tail_log(self, n=2000):
        try:
            return open(self.log_path, errors="replace").read()[-n:]
        except OSError:
            return ""

    def count_log(self, needle):
        try:
            return open(self.log_path, errors="replace").read().count(needle)
        except OSError:
            return 0

    def stop(self, give_up_after=60.0):
        """SIGTERM, then wait. Returns (seconds_to_exit or None, exit code).

        None means it did not exit within give_up_after; it is then SIGKILLed.
        While waiting, RSS and threads are sampled every second into
        self.stop_samples as (seconds since SIGTERM, rss_bytes, threads).
        """
        self.stop_samples = []
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        while True:
            try:
                code = self.proc.wait(timeout=0.02)
                return round(time.monotonic() - t0, 3), code
            except subprocess.TimeoutExpired:
                pass
            elapsed = time.monotonic() - t0
            if elapsed >= give_up_after:
                self.proc.kill()
                return None, self.proc.wait()
            if len(self.stop_samples) <= elapsed:
                rss, thr = proc_status(self.pid)
                self.stop_samples.append((round(elapsed, 2), rss, thr))


class BotConnection:
    """One Unix-socket connection that writes bot messages as JSON lines."""

    def __init__(self, socket_path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(socket_path)

    def send(self, messages, compact=False):
        sep = (",", ":") if compact else None
        data = b"".join(json.dumps(m, separators=sep).encode() + b"\n" for m in messages)
        self.sock.sendall(data)
        return len(data)

    def close(self):
        self.sock.close()


def metric_value(body, name, labels=None):
    """The value of the first sample `name` (with `labels` text, if given)."""
    prefix = name + ("{" + labels + "}" if labels else "")
    for line in body.split("\n"):
        if line.startswith(prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def wait_for_log_count(exporter, needle, want, timeout):
    """Wait until the exporter's log holds `want` lines containing `needle`.

    Lets a script know that every registration was applied without scraping
    /metrics (a scrape would itself grow the heap being measured).
    Returns seconds waited, or None on timeout.
    """
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if exporter.count_log(needle) >= want:
            return round(time.monotonic() - t0, 2)
        time.sleep(0.2)
    return None


def wait_queue_drained(addr, timeout):
    """Wait until /health reports an empty writer queue; seconds or None."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            _, body, _ = http_get(addr, "/health", timeout=10)
            if json.loads(body)["components"]["queue"]["depth"] == 0:
                return round(time.monotonic() - t0, 2)
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    return None


def register_messages(channel, pid, features, usage=True):
    """The register line (and one llm_usage line) a bot sends at start-up."""
    msgs = [{"type": "register", "channel": channel, "pid": pid, "features": features}]
    if usage:
        msgs.append({"type": "llm_usage", "channel": channel, "model": "gpt-4", "feature": "jokes",
                     "tokens_in": 145, "tokens_out": 87, "latency_ms": 1850})
    return msgs


def wait_for_idle_machine(max_wait, log=None):
    """Wait (at most max_wait s) until no cargo/rustc process runs.

    The machine has few cores and other people build on it; figures taken
    during a build mostly measure the build. Returns seconds waited.
    """
    t0 = time.monotonic()
    if log and machine_facts()["cargo_rustc_processes"]:
        log(f"waiting up to {max_wait} s for other cargo/rustc processes to finish...")
    while machine_facts()["cargo_rustc_processes"] and time.monotonic() - t0 < max_wait:
        time.sleep(5)
    return round(time.monotonic() - t0, 1)
