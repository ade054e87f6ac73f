#!/usr/bin/env python3
"""slow_scrapers: many /metrics requests whose clients never read.

What it does
  1. Starts the exporter with --limits.max-bots=20000 and
     --sampler.interval=1h, and registers --bots bots (10,000) over one
     Unix-socket connection: per bot a register line (pid 100000+i,
     features llm/translator) and one llm_usage line.
     Why the sampler flag: those pids do not exist (pid_max is usually
     32768), so the default 15 s sampler would turn every bot "dead" in the
     middle of the run and change the series set. Its first pass runs at
     start-up, before any bot, and the next one after an hour, so every
     bot stays "online" for the whole run. --sampler-interval 15s measures
     the default instead.
  2. Waits until the log shows every registration and /health shows an
     empty writer queue, records the RSS (before any scrape), then does one
     normal scrape: time, body size, kissbot_exporter_bots, number of bots
     with kissbot_bot_status{status="online"} 1, and the RSS after it.
  3. Opens --slow (250) TCP connections, SO_RCVBUF 4096 set before
     connect; each sends "GET /metrics HTTP/1.1" and never reads.
  4. For --duration (20) s samples the exporter's RSS and threads every
     0.5 s while another thread scrapes /metrics normally (fresh
     connection, 60 s timeout, 1 s pause between scrapes). If the scrape in
     flight at the end of the window has not answered, the slow
     connections stay open (sampling continues) until it answers or times
     out, so its latency is known. Safety: above --rss-cap-mib (default
     half of MemAvailable) the exporter is SIGKILLed and the run reported
     as aborted.
  5. Counts slow connections with response bytes waiting (FIONREAD),
     closes them, samples RSS 5 s more, stops the exporter (SIGTERM, timed).

Output: one JSON object on stdout (progress goes to stderr).

  python3 slow_scrapers.py --binary PATH
"""

import argparse
import array
import fcntl
import json
import os
import socket
import sys
import termios
import threading
import time

sys.dont_write_bytecode = True  # keep the folder free of __pycache__
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stresslib as sl  # noqa: E402


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def pending_bytes(s):
    """Bytes received on `s` and not yet read (FIONREAD)."""
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(s.fileno(), termios.FIONREAD, buf, True)
    except OSError:
        return -1
    return buf[0]


def scraper(addr, stop, results, timeout):
    """Normal scrapes on fresh connections, one at a time, 1 s apart."""
    start = time.monotonic()
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            status, body, dt = sl.http_get(addr, "/metrics", timeout=timeout)
            results.append({"t": round(t0 - start, 2), "status": status, "seconds": round(dt, 3), "bytes": len(body)})
        except (OSError, ValueError) as e:
            results.append({"t": round(t0 - start, 2), "error": repr(e), "seconds": round(time.monotonic() - t0, 3)})
        stop.wait(1.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", required=True, help="kissbot-exporter binary to measure")
    ap.add_argument("--bots", type=int, default=10_000)
    ap.add_argument("--slow", type=int, default=250, help="connections that never read")
    ap.add_argument("--rcvbuf", type=int, default=4096)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--scrape-timeout", type=float, default=60.0)
    ap.add_argument("--sampler-interval", default="1h", help="exporter --sampler.interval (see above)")
    ap.add_argument("--rss-cap-mib", type=float, default=None)
    ap.add_argument("--wait-idle", type=float, default=600, help="max s to wait for other cargo/rustc to end")
    args = ap.parse_args()
    waited = sl.wait_for_idle_machine(args.wait_idle, log)
    facts_before = sl.machine_facts()
    cap = args.rss_cap_mib or facts_before["mem_available_mib"] / 2
    flags = ["--limits.max-bots=20000", f"--sampler.interval={args.sampler_interval}"]

    with sl.Exporter(args.binary, flags) as exp:
        log(f"exporter pid {exp.pid} on {exp.addr}, up in {exp.startup_s} s")
        rss_empty, _ = sl.proc_status(exp.pid)
        conn = sl.BotConnection(exp.socket_path)
        t0 = time.monotonic()
        batch = []
        for i in range(1, args.bots + 1):
            batch += sl.register_messages(f"bot{i:05d}", 100000 + i, {"llm": True, "translator": False})
            if len(batch) >= 1000:
                conn.send(batch)
                batch = []
        conn.send(batch)
        reg_wait = sl.wait_for_log_count(exp, "bot registered", args.bots, 120)
        drained = sl.wait_queue_drained(exp.addr, 120)
        register_s = round(time.monotonic() - t0, 2)
        conn.close()
        time.sleep(1)
        rss_registered, threads_registered = sl.proc_status(exp.pid)
        log(f"{args.bots} bots registered in {register_s} s")

        status, body, scrape_s = sl.http_get(exp.addr, "/metrics", timeout=60)
        text = body.decode()
        baseline = {
            "status": status,
            "scrape_s": round(scrape_s, 3),
            "body_bytes": len(body),
            "kissbot_exporter_bots": sl.metric_value(text, "kissbot_exporter_bots"),
            "bots_online": text.count('status="online"} 1\n'),
            "rss_after_scrape_mib": sl.mib(sl.proc_status(exp.pid)[0]),
        }
        del text, body
        log(f"baseline: {baseline}")

        # The slow readers.
        slow, connect_errors = [], 0
        host, port = exp.addr.rsplit(":", 1)
        for _ in range(args.slow):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
            try:
                s.settimeout(5)
                s.connect((host, int(port)))
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                slow.append(s)
            except OSError:
                connect_errors += 1
                s.close()
        log(f"{len(slow)} slow connections open")

        stop = threading.Event()
        scrapes = []
        th = threading.Thread(target=scraper, args=(exp.addr, stop, scrapes, args.scrape_timeout), daemon=True)
        th.start()
        samples, aborted = [], None
        t_start = time.monotonic()
        while True:
            elapsed = time.monotonic() - t_start
            if elapsed >= args.duration:
                stop.set()  # no new normal scrape; wait for the one in flight
                if not th.is_alive():
                    break
            rss, thr = sl.proc_status(exp.pid)
            if rss is None:
                aborted = "exporter exited during the test"
                break
            samples.append((round(elapsed, 2), sl.mib(rss), thr))
            if rss / 1048576 > cap:
                aborted = f"RSS {sl.mib(rss)} MiB passed the cap of {round(cap)} MiB; exporter SIGKILLed"
                exp.proc.kill()
                break
            time.sleep(0.5)
        stop.set()
        th.join(timeout=args.scrape_timeout + 5)
        held_s = round(time.monotonic() - t_start, 2)
        waiting = [pending_bytes(s) for s in slow]
        for s in slow:
            s.close()
        after_close = []
        if not aborted:
            for _ in range(10):
                time.sleep(0.5)
                after_close.append(sl.mib(sl.proc_status(exp.pid)[0]))
            exit_s, code = exp.stop()
        else:
            exit_s, code = None, exp.proc.wait()
        facts_after = sl.machine_facts()

    in_window = [s for s in samples if s[0] <= args.duration]
    out = {
        "scenario": "slow_scrapers",
        "binary": os.path.abspath(args.binary),
        "command": exp.command,
        "waited_for_idle_machine_s": waited,
        "bots": args.bots,
        "startup_s": exp.startup_s,
        "rss_empty_mib": sl.mib(rss_empty),
        "register_s": register_s,
        "registrations_seen": reg_wait is not None,
        "queue_drained": drained is not None,
        "rss_registered_before_any_scrape_mib": sl.mib(rss_registered),
        "threads_registered": threads_registered,
        "baseline_scrape": baseline,
        "slow_connections": len(slow),
        "slow_connect_errors": connect_errors,
        "rss_peak_in_window_mib": max((s[1] for s in in_window), default=None),
        "rss_at_window_end_mib": in_window[-1][1] if in_window else None,
        "threads_peak_in_window": max((s[2] for s in in_window), default=None),
        "slow_held_open_s": held_s,
        "rss_peak_while_held_mib": max((s[1] for s in samples), default=None),
        "rss_final_while_held_mib": samples[-1][1] if samples else None,
        "slow_with_response_bytes_waiting": sum(1 for w in waiting if w > 0),
        "rss_samples_t_mib_threads": samples,
        "normal_scrapes_during": scrapes,
        "rss_after_closing_slow_mib": after_close,
        "aborted": aborted,
        "sigterm_to_exit_s": exit_s if (exit_s is not None or aborted) else "did not exit",
        "exit_code": code,
        "machine_before": facts_before,
        "machine_after": facts_after,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
