#!/usr/bin/env python3
"""feature_flood: bots that each declare thousands of features.

What it does
  1. Works out the largest feature count N whose register line, written
     compactly with feature names f0000, f0001, ... (all true), stays under
     the exporter's default --socket.max-line-bytes of 64 KiB (65,536).
  2. Starts the exporter with default limits (plus --sampler.interval=1h,
     for the reason given in slow_scrapers.py: the pids 100000+i do not
     exist and the default sampler would turn the bots "dead" mid-run) and
     registers --bots (2,000) bots with N features each, over one
     Unix-socket connection.
  3. Waits until the log shows every registration and /health shows an
     empty writer queue, then reports the idle RSS (before any scrape).
  4. Scrapes /metrics twice (plain text, 300 s timeout), sampling RSS every
     0.1 s meanwhile: scrape time, body size, number of
     kissbot_bot_feature_enabled series, kissbot_exporter_bots, peak RSS
     during the scrape and RSS after.
  5. Stops the exporter (SIGTERM, timed).

Output: one JSON object on stdout (progress goes to stderr).

  python3 feature_flood.py --binary PATH
"""

import argparse
import json
import os
import sys
import threading
import time

sys.dont_write_bytecode = True  # keep the folder free of __pycache__
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stresslib as sl  # noqa: E402

MAX_LINE = 64 * 1024  # the exporter's default --socket.max-line-bytes


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def register_line(channel, pid, n):
    msg = {"type": "register", "channel": channel, "pid": pid, "features": {f"f{i:04d}": True for i in range(n)}}
    return json.dumps(msg, separators=(",", ":")).encode()


def largest_feature_count(limit):
    """Largest n whose longest register line (channel bot99999) is < limit bytes."""
    lo, hi = 1, 9999  # names f0000..f9999
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(register_line("bot99999", 199999, mid)) < limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def timed_scrape(exp, timeout):
    """One plain /metrics scrape while sampling RSS every 0.1 s."""
    stop = threading.Event()
    sampler = sl.Sampler(exp.pid, 0.1, stop)
    sampler.start()
    try:
        status, body, dt = sl.http_get(exp.addr, "/metrics", timeout=timeout)
    finally:
        stop.set()
        sampler.join()
    text_bots = None
    i = body.rfind(b"\nkissbot_exporter_bots ")
    if i >= 0:
        text_bots = float(body[i + 1:body.index(b"\n", i + 1)].split()[1])
    return {
        "status": status,
        "seconds": round(dt, 3),
        "body_bytes": len(body),
        "body_mib": sl.mib(len(body)),
        "feature_enabled_series": body.count(b"\nkissbot_bot_feature_enabled{"),
        "kissbot_exporter_bots": text_bots,
        "rss_peak_during_mib": sl.mib(sampler.peak_rss()),
        "threads_peak_during": sampler.peak_threads(),
        "rss_after_mib": sl.mib(sl.proc_status(exp.pid)[0]),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", required=True, help="kissbot-exporter binary to measure")
    ap.add_argument("--bots", type=int, default=2000)
    ap.add_argument("--features", type=int, default=None, help="default: the largest that fits in 64 KiB")
    ap.add_argument("--scrapes", type=int, default=2)
    ap.add_argument("--scrape-timeout", type=float, default=300.0)
    ap.add_argument("--sampler-interval", default="1h")
    ap.add_argument("--wait-idle", type=float, default=600, help="max s to wait for other cargo/rustc to end")
    args = ap.parse_args()
    n = args.features or largest_feature_count(MAX_LINE)
    longest = len(register_line(f"bot{args.bots:05d}", 100000 + args.bots, n))
    log(f"{n} features per bot; longest register line {longest} bytes")
    waited = sl.wait_for_idle_machine(args.wait_idle, log)
    facts_before = sl.machine_facts()

    with sl.Exporter(args.binary, [f"--sampler.interval={args.sampler_interval}"]) as exp:
        log(f"exporter pid {exp.pid} on {exp.addr}, up in {exp.startup_s} s")
        rss_empty, _ = sl.proc_status(exp.pid)
        conn = sl.BotConnection(exp.socket_path)
        conn.sock.settimeout(300)
        t0 = time.monotonic()
        sent = 0
        for i in range(1, args.bots + 1):
            line = register_line(f"bot{i:05d}", 100000 + i, n) + b"\n"
            conn.sock.sendall(line)
            sent += len(line)
        reg_wait = sl.wait_for_log_count(exp, "bot registered", args.bots, 600)
        drained = sl.wait_queue_drained(exp.addr, 600)
        register_s = round(time.monotonic() - t0, 2)
        conn.close()
        log(f"{args.bots} bots registered in {register_s} s ({sl.mib(sent)} MiB sent)")
        time.sleep(2)
        rss_idle, threads_idle = sl.proc_status(exp.pid)
        scrapes = []
        for k in range(args.scrapes):
            scrapes.append(timed_scrape(exp, args.scrape_timeout))
            log(f"scrape {k + 1}: {scrapes[-1]}")
        registered_in_log = exp.count_log("bot registered")
        exit_s, code = exp.stop()
        facts_after = sl.machine_facts()

    out = {
        "scenario": "feature_flood",
        "binary": os.path.abspath(args.binary),
        "command": exp.command,
        "waited_for_idle_machine_s": waited,
        "bots": args.bots,
        "features_per_bot": n,
        "longest_register_line_bytes": longest,
        "bytes_sent": sent,
        "startup_s": exp.startup_s,
        "rss_empty_mib": sl.mib(rss_empty),
        "register_s": register_s,
        "registrations_seen": reg_wait is not None,
        "queue_drained": drained is not None,
        "idle_rss_mib": sl.mib(rss_idle),
        "idle_threads": threads_idle,
        "scrapes": scrapes,
        "registrations_in_log": registered_in_log,
        "sigterm_to_exit_s": exit_s if exit_s is not None else "did not exit",
        "exit_code": code,
        "machine_before": facts_before,
        "machine_after": facts_after,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
