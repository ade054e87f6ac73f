//! The sender threads. Each one owns every `--senders`-th bot, sends its
//! lines in writes of `lines_per_write`, paced to its share of `--rate`, and
//! times every write. The two `--mode`s differ only in the connection a
//! write goes out on: a new one each time, or one kept for the whole run.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::anyhow;

use super::plan::Plan;
use crate::report::nanos;
use crate::{IngestArgs, Mode};

/// How long a run with `--count` may last at most.
const COUNT_RUN_LIMIT: Duration = Duration::from_secs(3600);

/// What all senders did, together.
pub(super) struct Sent {
    /// Lines delivered.
    pub(super) lines: u64,
    /// Of those, llm_usage lines.
    pub(super) llm_usage: u64,
    /// Lines whose write failed.
    pub(super) errors: u64,
    /// How long each delivered write took, in nanoseconds, sorted.
    pub(super) latencies_ns: Vec<u32>,
    /// From the start of sending until the last sender finished.
    pub(super) seconds: f64,
}

/// Runs `--senders` threads until the duration has passed or `--count`
/// lines are claimed, and sums what they did.
pub(super) fn send_all(args: &IngestArgs, plan: &Plan, start: Instant) -> anyhow::Result<Sent> {
    let deadline = start + if args.count.is_some() { COUNT_RUN_LIMIT } else { args.duration };
    let per_sender_rate = args.rate / args.senders as f64;
    let claimed = AtomicU64::new(0);
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.senders)
            .map(|id| {
                let sender = Sender::new(id, args, plan, &claimed);
                s.spawn(move || sender.run(deadline, per_sender_rate, start))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("a sender thread panicked")))
            .collect::<anyhow::Result<Vec<Tally>>>()
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let mut sent = Sent { lines: 0, llm_usage: 0, errors: 0, latencies_ns: Vec::new(), seconds };
    for t in results {
        sent.lines += t.lines;
        sent.llm_usage += t.llm_usage;
        sent.errors += t.errors;
        sent.latencies_ns.extend(t.latencies_ns);
    }
    sent.latencies_ns.sort_unstable();
    Ok(sent)
}

/// What one sender did.
struct Tally {
    lines: u64,
    llm_usage: u64,
    errors: u64,
    latencies_ns: Vec<u32>,
}

/// One sender thread's state.
struct Sender<'a> {
    args: &'a IngestArgs,
    plan: &'a Plan,
    /// Lines claimed by all senders, against `--count`.
    claimed: &'a AtomicU64,
    /// The bots this sender plays, and the next one's index among them.
    bots: Vec<usize>,
    next: usize,
    /// llm_usage owed, in fractions of a line: `--llm-ratio` per line.
    llm_owed: f64,
    conn: Connection<'a>,
}

impl<'a> Sender<'a> {
    fn new(id: usize, args: &'a IngestArgs, plan: &'a Plan, claimed: &'a AtomicU64) -> Sender<'a> {
        Sender {
            args,
            plan,
            claimed,
            bots: (id..plan.bots()).step_by(args.senders).collect(),
            next: 0,
            llm_owed: 0.0,
            conn: Connection::new(args.mode, &args.socket),
        }
    }

    fn run(mut self, deadline: Instant, rate: f64, start: Instant) -> Tally {
        let mut tally = Tally { lines: 0, llm_usage: 0, errors: 0, latencies_ns: Vec::with_capacity(1 << 16) };
        if self.bots.is_empty() {
            return tally;
        }
        let batch = self.args.lines_per_write();
        let mut buf: Vec<u8> = Vec::with_capacity(batch * 200);
        let mut writes = 0u64;
        while Instant::now() < deadline {
            let Some(n) = self.claim(batch) else { break };
            if rate > 0.0 {
                pace(start, writes, batch, rate);
            }
            let llm = self.fill(&mut buf, n);
            writes += 1;
            let t = Instant::now();
            let delivered = self.conn.write(&buf);
            let took = t.elapsed();
            if delivered {
                tally.lines += n as u64;
                tally.llm_usage += llm;
                tally.latencies_ns.push(nanos(took));
            } else {
                tally.errors += n as u64;
                // The exporter is gone or refusing: do not spin on it.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        tally
    }

    /// How many lines the next write carries: `batch`, or what is left of
    /// `--count` (`None` once it is all claimed).
    fn claim(&self, batch: usize) -> Option<usize> {
        let Some(total) = self.args.count else { return Some(batch) };
        let got = self.claimed.fetch_add(batch as u64, Ordering::Relaxed);
        if got >= total {
            return None;
        }
        // At most `batch`, so the conversion cannot truncate.
        Some((total - got).min(batch as u64) as usize)
    }

    /// Puts the next `n` lines into `buf`, each bot in turn, llm_usage in
    /// the `--llm-ratio` proportion and heartbeats otherwise; returns how
    /// many are llm_usage.
    fn fill(&mut self, buf: &mut Vec<u8>, n: usize) -> u64 {
        buf.clear();
        let mut llm = 0;
        for _ in 0..n {
            let bot = self.bots[self.next];
            self.next = (self.next + 1) % self.bots.len();
            self.llm_owed += self.args.llm_ratio;
            if self.llm_owed >= 1.0 {
                self.llm_owed -= 1.0;
                buf.extend_from_slice(&self.plan.llm[bot]);
                llm += 1;
            } else {
                buf.extend_from_slice(&self.plan.heartbeat[bot]);
            }
        }
        llm
    }
}

/// Sleeps until write number `writes` is due on a fixed schedule of `rate`
/// lines per second from `start`. Late writes are not made up faster than
/// the sender can go.
fn pace(start: Instant, writes: u64, batch: usize, rate: f64) {
    let due = start + Duration::from_secs_f64(writes as f64 * batch as f64 / rate);
    let now = Instant::now();
    if due > now {
        std::thread::sleep(due - now);
    }
}

/// A sender's way to the socket, per `--mode`.
struct Connection<'a> {
    mode: Mode,
    socket: &'a Path,
    /// The connection kept between writes in long-lived mode.
    kept: Option<UnixStream>,
}

impl<'a> Connection<'a> {
    fn new(mode: Mode, socket: &'a Path) -> Connection<'a> {
        Connection { mode, socket, kept: None }
    }

    /// Writes `buf`; returns whether all of it was written.
    fn write(&mut self, buf: &[u8]) -> bool {
        match self.mode {
            Mode::PerMessage => self.per_message(buf),
            Mode::LongLived => self.long_lived(buf),
        }
    }

    /// Like the stock client: connect, write, close.
    fn per_message(&self, buf: &[u8]) -> bool {
        UnixStream::connect(self.socket).and_then(|mut s| s.write_all(buf)).is_ok()
    }

    /// On the kept connection, connecting first if there is none; a failed
    /// write drops it, and the next write connects again.
    fn long_lived(&mut self, buf: &[u8]) -> bool {
        let stream = match self.kept.take() {
            Some(s) => Ok(s),
            None => UnixStream::connect(self.socket),
        };
        match stream.and_then(|mut s| s.write_all(buf).map(|()| s)) {
            Ok(s) => {
                self.kept = Some(s);
                true
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use clap::Parser;
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    fn args(flags: &[&str]) -> IngestArgs {
        let mut all = vec!["kissbot-loadgen", "ingest"];
        all.extend_from_slice(flags);
        match crate::Cli::parse_from(all).command {
            crate::Command::Ingest(args) => args,
            crate::Command::Scrape(_) => unreachable!("parsed an ingest"),
        }
    }

    #[test]
    fn senders_share_the_bots_and_mix_in_llm_usage() {
        let args = args(&["--bots", "5", "--senders", "2", "--llm-ratio", "0.25"]);
        let plan = Plan::build(5, 1, 1).unwrap();
        let claimed = AtomicU64::new(0);
        let mut second = Sender::new(1, &args, &plan, &claimed);
        assert_eq!(second.bots, [1, 3]);
        let mut buf = Vec::new();
        assert_eq!(second.fill(&mut buf, 8), 2);
        let text = String::from_utf8(buf).unwrap();
        assert_eq!(text.lines().count(), 8);
        assert_eq!(text.matches("loadbot-00001").count(), 4);
        assert_eq!(text.matches("\"llm_usage\"").count(), 2);
    }

    #[test]
    fn count_is_claimed_in_batches_and_stops_exactly() {
        let args = args(&["--count", "10", "--mode", "long-lived", "--batch", "4"]);
        let plan = Plan::build(1, 1, 1).unwrap();
        let claimed = AtomicU64::new(0);
        let s = Sender::new(0, &args, &plan, &claimed);
        let batch = args.lines_per_write();
        assert_eq!([s.claim(batch), s.claim(batch), s.claim(batch), s.claim(batch)], [Some(4), Some(4), Some(2), None]);
    }

    #[test]
    fn both_modes_deliver_every_line() {
        let dir = std::env::temp_dir().join(format!("kissbot-loadgen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for mode in ["per-message", "long-lived"] {
            let socket = dir.join(format!("{mode}.sock"));
            let listener = UnixListener::bind(&socket).unwrap();
            let reader = std::thread::spawn(move || {
                let mut got = String::new();
                for conn in listener.incoming().take(if mode == "per-message" { 6 } else { 1 }) {
                    conn.unwrap().read_to_string(&mut got).unwrap();
                }
                got
            });
            let socket_flag = socket.to_str().unwrap();
            let args =
                args(&["--socket", socket_flag, "--mode", mode, "--batch", "2", "--count", "6", "--senders", "1"]);
            let plan = Plan::build(3, 1, 1).unwrap();
            let sent = send_all(&args, &plan, Instant::now()).unwrap();
            assert_eq!((sent.lines, sent.errors), (6, 0), "{mode}");
            let writes = if mode == "per-message" { 6 } else { 3 };
            assert_eq!(sent.latencies_ns.len(), writes, "{mode}");
            assert!(sent.latencies_ns.windows(2).all(|w| w[0] <= w[1]));
            let got = reader.join().unwrap();
            assert_eq!(got.lines().count(), 6, "{mode}: {got}");
            let _ = std::fs::remove_file(&socket);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
