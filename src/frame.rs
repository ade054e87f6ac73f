//! JSON Lines framing: turns the bytes of a stream into complete lines,
//! bounding every line's length. Pure and synchronous, so that it can be
//! tested and fuzzed without a socket.
//!
//! A line longer than the limit is dropped whole — what was buffered is
//! freed at once and the rest is skipped up to the next newline — and
//! reported once, however many reads it spans.

/// Splits a byte stream into lines of at most `max` bytes.
#[derive(Debug)]
pub struct Framer {
    buf: Vec<u8>,
    max: usize,
    /// True while skipping the rest of an over-long line.
    discarding: bool,
    /// Bytes at the front of `buf` already returned as lines.
    consumed: usize,
}

/// What one read completed.
#[derive(Debug, Default, PartialEq)]
pub struct Frames<'a> {
    /// Complete lines, without their `\n`.
    pub lines: Vec<&'a [u8]>,
    /// Over-long lines dropped in this read.
    pub too_long: usize,
}

/// A buffer that stays this large after a burst is released once idle.
const SHRINK_ABOVE: usize = 64 * 1024;

impl Framer {
    /// A framer for lines of at most `max` bytes.
    pub fn new(max: usize) -> Framer {
        Framer { buf: Vec::with_capacity(1024), max, discarding: false, consumed: 0 }
    }

    /// The buffer to read into. Lines returned by the previous [`scan`]
    /// are released first.
    ///
    /// [`scan`]: Framer::scan
    pub(crate) fn buffer(&mut self) -> &mut Vec<u8> {
        if self.consumed > 0 {
            self.buf.drain(..self.consumed);
            self.consumed = 0;
        }
        if self.buf.is_empty() && self.buf.capacity() > SHRINK_ABOVE {
            self.buf = Vec::with_capacity(1024);
        }
        if self.buf.capacity() - self.buf.len() < 512 {
            self.buf.reserve(8192.min(self.max.saturating_add(1)));
        }
        &mut self.buf
    }

    /// Splits off the lines that the last `read` bytes appended to the
    /// buffer completed.
    pub(crate) fn scan(&mut self, read: usize) -> Frames<'_> {
        let scan_from = self.buf.len().saturating_sub(read);
        let Some(last_nl) = memchr::memrchr(b'\n', &self.buf[scan_from..]).map(|i| scan_from + i) else {
            let mut too_long = 0;
            if self.buf.len() > self.max {
                too_long = usize::from(!self.discarding);
                self.discarding = true;
                self.buf.clear();
            }
            return Frames { lines: Vec::new(), too_long };
        };
        let tail = self.buf.len() - (last_nl + 1);
        let mut pieces = self.buf[..last_nl].split(|b| *b == b'\n');
        if self.discarding {
            // The first piece is the end of the over-long line.
            pieces.next();
        }
        let mut frames = Frames::default();
        for line in pieces {
            if line.len() > self.max {
                frames.too_long += 1;
            } else {
                frames.lines.push(line);
            }
        }
        // The unfinished tail is already too long: drop it with the lines.
        self.discarding = tail > self.max;
        if self.discarding {
            frames.too_long += 1;
            self.consumed = self.buf.len();
        } else {
            self.consumed = last_nl + 1;
        }
        frames
    }

    /// Appends bytes and scans them; for callers that do not read into
    /// [`Framer::buffer`] directly.
    pub fn push(&mut self, data: &[u8]) -> Frames<'_> {
        self.buffer().extend_from_slice(data);
        self.scan(data.len())
    }

    /// True while part of a line has arrived and its newline has not: the
    /// bytes of an unfinished line, or the rest of an over-long one.
    pub(crate) fn mid_line(&self) -> bool {
        self.discarding || self.buf.len() > self.consumed
    }

    /// At end of stream: the last line if it had no newline (and was not
    /// being skipped). A sender that dies mid-line leaves a fragment here,
    /// which then fails to parse and is counted.
    pub fn finish(&mut self) -> Option<&[u8]> {
        let rest = &self.buf[self.consumed..];
        (!self.discarding && !rest.is_empty()).then_some(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(f: &mut Framer, chunks: &[&[u8]]) -> (Vec<Vec<u8>>, usize) {
        let (mut lines, mut long) = (Vec::new(), 0);
        for c in chunks {
            let fr = f.push(c);
            lines.extend(fr.lines.iter().map(|l| l.to_vec()));
            long += fr.too_long;
        }
        (lines, long)
    }

    #[test]
    fn lines_across_reads() {
        let mut f = Framer::new(10);
        let (lines, long) = all(&mut f, &[b"ab", b"c\nde", b"f\n\ng", b"h"]);
        assert_eq!(lines, [b"abc".to_vec(), b"def".to_vec(), b"".to_vec()]);
        assert_eq!(long, 0);
        assert_eq!(f.finish(), Some(&b"gh"[..]));
    }

    #[test]
    fn long_lines_are_dropped_once_and_the_next_line_survives() {
        let mut f = Framer::new(4);
        let (lines, long) = all(&mut f, &[b"0123", b"456", b"789", b"\nok\n"]);
        assert_eq!((lines, long), (vec![b"ok".to_vec()], 1));
        let (lines, long) = all(&mut f, &[b"toolong\nfine\nalso-too-long"]);
        assert_eq!((lines, long), (vec![b"fine".to_vec()], 2));
        let (lines, long) = all(&mut f, &[b"-still\nyes\n"]);
        assert_eq!((lines, long), (vec![b"yes".to_vec()], 0), "the tail of a dropped line is not a line");
        assert_eq!(f.finish(), None);
    }

    #[test]
    fn buffer_is_released_after_a_burst() {
        let mut f = Framer::new(1 << 20);
        let big = vec![b'x'; 200_000];
        let _ = f.push(&big);
        let _ = f.push(b"\n");
        assert!(f.buffer().capacity() <= SHRINK_ABOVE);
    }
}
