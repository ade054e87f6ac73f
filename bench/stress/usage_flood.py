#!/usr/bin/env python3
"""usage_flood: abandoned /api/usage queries against a big database.

What it does
  1. Builds (once; cached at --cache) a legacy-shaped SQLite file holding
     --rows llm_usage rows (default 2,000,000): ISO-8601 ts spread over the
     last 90 days, 200 channels, 5 models, 5 features, no indexes.
  2. Starts the exporter on a copy of that file with --db.retention=0 and
     waits for GET /metrics to answer 200 (start-up includes the in-place
     migration, i.e. building the indexes; reported as startup_s), then
     times one undisturbed usage query for scale.
  3. For --duration seconds (15), --clients threads (32) each loop: connect
     to 127.0.0.1, send "GET /api/usage?group_by=channel", wait at most
     0.3 s for the answer, then reset the connection (SO_LINGER 0) and retry
     at once. Answers that do arrive within 0.3 s are counted by status.
     A probe thread GETs /metrics every 250 ms (5 s timeout) and records
     the latency; every second the exporter's VmRSS and Threads are read
     from /proc/PID/status.
  4. Sends SIGTERM and times the exit (gives up after 60 s: SIGKILL and
     "did not exit").

Output: one JSON object on stdout (progress goes to stderr).

  python3 usage_flood.py --binary PATH [--cache /var/tmp/kissbot-usage-2m.db]
"""

import argparse
import datetime
import json
import os
import random
import socket
import sqlite3
import struct
import sys
import threading
import time

sys.dont_write_bytecode = True  # keep the folder free of __pycache__
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stresslib as sl  # noqa: E402

SCHEMA = (
    "CREATE TABLE llm_usage(id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL, "
    "channel TEXT NOT NULL, model TEXT NOT NULL, feature TEXT NOT NULL, "
    "tokens_in INTEGER NOT NULL, tokens_out INTEGER NOT NULL, latency_ms REAL)"
)
MODELS = ["gpt-4", "gpt-4o-mini", "claude-3-haiku", "mistral-small", "llama-3-70b"]
FEATURES = ["jokes", "translator", "summary", "moderation", "quiz"]
CHANNELS = [f"channel{i:03d}" for i in range(200)]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def build_db(path, rows, seed=1):
    """Writes `rows` llm_usage rows to a new file at `path` (atomically)."""
    tmp = path + ".part"
    if os.path.exists(tmp):
        os.remove(tmp)
    rnd = random.Random(seed)
    now = datetime.datetime.now(datetime.timezone.utc)
    span = 90 * 86400
    t0 = time.monotonic()
    conn = sqlite3.connect(tmp)
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute(SCHEMA)

    def gen():
        for _ in range(rows):
            ts = now - datetime.timedelta(seconds=rnd.random() * span)
            yield (
                ts.isoformat(timespec="microseconds"),
                rnd.choice(CHANNELS),
                rnd.choice(MODELS),
                rnd.choice(FEATURES),
                rnd.randint(10, 4000),
                rnd.randint(5, 1500),
                round(rnd.uniform(100, 8000), 1),
            )

    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO llm_usage(ts, channel, model, feature, tokens_in, tokens_out, latency_ms) "
        "VALUES (?,?,?,?,?,?,?)",
        gen(),
    )
    conn.commit()
    conn.close()
    os.replace(tmp, path)
    log(f"built {path}: {rows} rows in {time.monotonic() - t0:.1f} s")


def cached_db(path, rows):
    """Returns `path`, building it unless it already holds `rows` rows."""
    if os.path.exists(path):
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            n = conn.execute("SELECT COUNT(*) FROM llm_usage").fetchone()[0]
            conn.close()
            if n == rows:
                log(f"using cached {path} ({n} rows)")
                return path
        except sqlite3.Error:
            pass
        log(f"cache {path} does not hold {rows} rows; rebuilding")
    build_db(path, rows)
    return path


def usage_client(addr, stop, counts, lock, answer_timeout):
    """Loops: request /api/usage, wait <= answer_timeout, reset, repeat."""
    host, port = addr.rsplit(":", 1)
    req = f"GET /api/usage?group_by=channel HTTP/1.1\r\nHost: {addr}\r\n\r\n".encode()
    linger = struct.pack("ii", 1, 0)  # close() sends RST
    while not stop.is_set():
        outcome = "no_answer_in_time"
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            s.settimeout(answer_timeout)
            deadline = time.monotonic() + answer_timeout
            s.connect((host, int(port)))
            s.sendall(req)
            buf = b""
            while b"\r\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                s.settimeout(left)
                chunk = s.recv(4096)
                if not chunk:
                    outcome = "closed_by_server"
                    break
                buf += chunk
            if b"\r\n" in buf:
                outcome = "http_" + buf.split(b" ", 2)[1].decode(errors="replace")
        except socket.timeout:
            outcome = "no_answer_in_time"
        except ConnectionRefusedError:
            outcome = "connect_refused"
        except OSError as e:
            outcome = f"error_{type(e).__name__}"
        finally:
            s.close()
        with lock:
            counts[outcome] = counts.get(outcome, 0) + 1


def probe(addr, stop, results, interval, timeout):
    """GET /metrics every `interval` s; records (latency or None, status, t).

    Probes are sequential: one that hangs for the full timeout delays the
    next, so fewer than duration/interval probes run when the server stalls.
    """
    start = nxt = time.monotonic()
    while not stop.is_set():
        t0 = time.monotonic()
        at = round(t0 - start, 2)
        try:
            status, _, dt = sl.http_get(addr, "/metrics", timeout=timeout)
            results.append((dt, status, at))
        except (OSError, ValueError):
            results.append((None, f"failed after {time.monotonic() - t0:.2f}s", at))
        nxt += interval
        stop.wait(max(0.0, nxt - time.monotonic()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", required=True, help="kissbot-exporter binary to measure")
    ap.add_argument("--cache", default="/var/tmp/kissbot-stress-usage-2m.db", help="cached generated database")
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--answer-timeout", type=float, default=0.3)
    ap.add_argument("--exit-timeout", type=float, default=60.0)
    ap.add_argument("--wait-idle", type=float, default=600, help="max s to wait for other cargo/rustc to end")
    args = ap.parse_args()

    db = cached_db(args.cache, args.rows)
    waited = sl.wait_for_idle_machine(args.wait_idle, log)
    facts_before = sl.machine_facts()
    with sl.Exporter(args.binary, ["--db.retention=0"], db_file=db) as exp:
        log(f"exporter pid {exp.pid} on {exp.addr}, up in {exp.startup_s} s")
        idle_rss, idle_threads = sl.proc_status(exp.pid)
        # One undisturbed query, for scale.
        try:
            st, body, single = sl.http_get(exp.addr, "/api/usage?group_by=channel", timeout=120)
            single_query = {"status": st, "seconds": round(single, 3), "groups": len(json.loads(body)["groups"])}
        except (OSError, ValueError) as e:
            single_query = {"error": repr(e)}
        log(f"single usage query: {single_query}")

        stop = threading.Event()
        sampler = sl.Sampler(exp.pid, 1.0, stop)
        counts, lock, probes = {}, threading.Lock(), []
        clients = [
            threading.Thread(target=usage_client, args=(exp.addr, stop, counts, lock, args.answer_timeout), daemon=True)
            for _ in range(args.clients)
        ]
        prober = threading.Thread(target=probe, args=(exp.addr, stop, probes, 0.25, 5.0), daemon=True)
        sampler.start()
        prober.start()
        for c in clients:
            c.start()
        time.sleep(args.duration)
        stop.set()
        for c in clients:
            c.join(timeout=10)
        prober.join(timeout=10)
        sampler.join(timeout=5)
        rss_end, threads_end = sl.proc_status(exp.pid)
        log("load stopped; sending SIGTERM")
        exit_s, code = exp.stop(args.exit_timeout)
        facts_after = sl.machine_facts()
        failed_log = exp.count_log("usage query failed")

    lat = [p[0] for p in probes if p[0] is not None]
    slow_or_failed = sum(1 for p in probes if p[0] is None or p[0] > 1.0 or p[1] != 200)
    out = {
        "scenario": "usage_flood",
        "binary": os.path.abspath(args.binary),
        "command": exp.command,
        "waited_for_idle_machine_s": waited,
        "rows": args.rows,
        "startup_s": exp.startup_s,
        "idle_rss_mib": sl.mib(idle_rss),
        "idle_threads": idle_threads,
        "single_usage_query": single_query,
        "usage_clients": args.clients,
        "duration_s": args.duration,
        "usage_outcomes": dict(sorted(counts.items())),
        "metrics_probe": {
            "count": len(probes),
            "answered": len(lat),
            "max_s": round(max(lat), 3) if lat else None,
            "p50_s": round(sl.percentile(lat, 50), 3) if lat else None,
            "p99_s": round(sl.percentile(lat, 99), 3) if lat else None,
            "over_1s_or_failed": slow_or_failed,
            "failures": [p[1] for p in probes if p[0] is None][:5],
            "timeline_t_latency": [(p[2], round(p[0], 3) if p[0] is not None else "fail") for p in probes],
        },
        "peak_rss_mib": sl.mib(sampler.peak_rss()),
        "peak_threads": sampler.peak_threads(),
        "rss_at_end_mib": sl.mib(rss_end),
        "threads_at_end": threads_end,
        "samples_t_rss_mib_threads": [(t, sl.mib(r), th) for t, r, th in sampler.samples],
        "sigterm_to_exit_s": exit_s if exit_s is not None else "did not exit",
        "exit_code": code,
        "during_exit_t_rss_mib_threads": [(t, sl.mib(r), th) for t, r, th in exp.stop_samples][::5],
        "usage_query_failed_log_lines": failed_log,
        "machine_before": facts_before,
        "machine_after": facts_after,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
