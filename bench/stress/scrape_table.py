#!/usr/bin/env python3
"""scrape_table: what a scrape costs at fleet scale.

For 100, 1,000 and 10,000 bots (each registered with two features and one
llm_usage call, so each has one LLM series and one latency histogram):

1. Starts a fresh exporter (--sampler.interval=1h: the bots' pids do not
   exist, and a sampler pass would turn them dead mid-run), registers the
   bots over one Unix-socket connection and waits until the queue drains.
2. Scrapes /metrics 30 times, one after another, plain text: the median
   and p90 time (client side: request to last byte), the body size; then
   once with Accept-Encoding: gzip for the compressed size and time.
3. At 10,000 bots only: the exporter's CPU time (utime + stime from
   /proc/PID/stat) for 30 scrapes by one scraper, then for 30 rounds of two
   scrapers that ask at the same moment (an HA pair scraping in step), and
   the RSS after 10 and after 100 scrapes.

Prints one JSON object. Run on an otherwise idle machine (see README.md).
"""

import argparse
import json
import os
import socket
import statistics
import threading
import time

from stresslib import Exporter, http_get, machine_facts, register_messages, wait_for_idle_machine
from stresslib import proc_status, mib, wait_queue_drained


def cpu_seconds(pid):
    """utime + stime of a pid, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def register(exporter, bots):
    lines = []
    for i in range(bots):
        for m in register_messages(f"bot{i:05d}", 100000 + i, {"llm": True, "translator": False}):
            lines.append(json.dumps(m))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(exporter.socket_path)
        s.sendall(("\n".join(lines) + "\n").encode())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status, body, _ = http_get(exporter.addr, "/metrics", timeout=60)
        if status == 200 and f"kissbot_exporter_bots {bots}".encode() in body:
            break
        time.sleep(0.5)
    wait_queue_drained(exporter.addr, 120)


def scrape(addr, gzip=False):
    headers = {"Accept-Encoding": "gzip"} if gzip else None
    status, body, seconds = http_get(addr, "/metrics", timeout=60, headers=headers)
    assert status == 200, status
    return seconds, len(body)


def measure(binary, bots, ha):
    with Exporter(binary, ["--limits.max-bots=20000", "--sampler.interval=1h"]) as e:
        register(e, bots)
        scrape(e.addr)  # warm-up
        times, size = [], 0
        for _ in range(30):
            t, size = scrape(e.addr)
            times.append(t)
        gz_t, gz_size = scrape(e.addr, gzip=True)
        row = {
            "bots": bots,
            "scrape_median_ms": round(statistics.median(times) * 1000, 1),
            "scrape_p90_ms": round(sorted(times)[int(0.9 * len(times)) - 1] * 1000, 1),
            "bytes": size,
            "gzip_bytes": gz_size,
            "gzip_scrape_ms": round(gz_t * 1000, 1),
        }
        if ha:
            pid = e.pid
            c0 = cpu_seconds(pid)
            for _ in range(30):
                scrape(e.addr)
            one = cpu_seconds(pid) - c0

            def pair():
                barrier = threading.Barrier(2)

                def go():
                    barrier.wait()
                    scrape(e.addr)

                threads = [threading.Thread(target=go) for _ in range(2)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()

            c0 = cpu_seconds(pid)
            for _ in range(30):
                pair()
            two = cpu_seconds(pid) - c0
            row["cpu_s_30_single_scrapes"] = round(one, 3)
            row["cpu_s_30_paired_scrapes"] = round(two, 3)
            row["ha_pair_cpu_ratio"] = round(two / one, 2) if one else None
            # RSS after 10 and after 100 scrapes in all (40 done so far + the pairs).
            fresh = Exporter(binary, ["--limits.max-bots=20000", "--sampler.interval=1h"])
            with fresh as f:
                register(f, bots)
                for _ in range(10):
                    scrape(f.addr)
                rss10 = proc_status(f.pid)[0]
                for _ in range(90):
                    scrape(f.addr)
                rss100 = proc_status(f.pid)[0]
            row["rss_after_10_scrapes_mib"] = mib(rss10)
            row["rss_after_100_scrapes_mib"] = mib(rss100)
        return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", required=True)
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--wait-idle", type=float, default=600)
    args = ap.parse_args()
    waited = wait_for_idle_machine(args.wait_idle)
    rows = []
    sizes = [int(s) for s in args.sizes.split(",")]
    for n in sizes:
        rows.append(measure(args.binary, n, ha=(n == max(sizes))))
    print(json.dumps({"scenario": "scrape_table", "waited_for_idle_machine_s": waited, "rows": rows,
                      "machine": machine_facts()}, indent=1))


if __name__ == "__main__":
    main()
