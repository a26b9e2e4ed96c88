//! Progress of long transfers (import, export, snapshot catch-up): a bar redrawn in
//! place on a terminal, one plain line per tenth otherwise (logs, pipes, CI).

use std::io::Write;
use std::time::Instant;

/// Counts bytes against a total and says when another tenth was reached.
#[derive(Debug, Clone)]
pub struct Tenths {
    total: u64,
    done: u64,
    reported: u64,
}

impl Tenths {
    /// A counter towards `total` bytes.
    pub fn new(total: u64) -> Tenths {
        Tenths {
            total,
            done: 0,
            reported: 0,
        }
    }

    /// Adds `n` bytes; returns the highest tenth (1 to 10) newly reached, if any.
    pub fn add(&mut self, n: u64) -> Option<u64> {
        self.done += n;
        let tenth = self.tenth();
        (tenth > self.reported).then(|| {
            self.reported = tenth;
            tenth
        })
    }

    /// Completed tenths, 0 to 10 (10 when the total is 0).
    pub fn tenth(&self) -> u64 {
        (self.done.min(self.total) * 10)
            .checked_div(self.total)
            .unwrap_or(10)
    }

    /// Bytes so far.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// The total.
    pub fn total(&self) -> u64 {
        self.total
    }
}

/// A progress display writing to `out`: a redrawn bar when `terminal`, else a line per
/// tenth such as `export app.db: 30% (3.0 of 10.0 MiB)`.
pub struct Progress<W: Write> {
    label: String,
    tenths: Tenths,
    out: W,
    terminal: bool,
    shown_percent: Option<u64>,
    start: Instant,
}

fn mib(n: u64) -> f64 {
    n as f64 / (1024.0 * 1024.0)
}

impl<W: Write> Progress<W> {
    /// A display of `label` towards `total` bytes.
    pub fn new(label: impl Into<String>, total: u64, out: W, terminal: bool) -> Progress<W> {
        Progress {
            label: label.into(),
            tenths: Tenths::new(total),
            out,
            terminal,
            shown_percent: None,
            start: Instant::now(),
        }
    }

    /// Adds `n` bytes and updates the display. Display errors are ignored: progress
    /// must never fail the transfer.
    pub fn add(&mut self, n: u64) {
        let tenth = self.tenths.add(n);
        let (done, total) = (self.tenths.done(), self.tenths.total());
        if self.terminal {
            let pct = (done.min(total) * 100).checked_div(total).unwrap_or(100);
            if self.shown_percent != Some(pct) {
                self.shown_percent = Some(pct);
                let bar = (pct / 4) as usize;
                let _ = write!(
                    self.out,
                    "\r{} [{}{}] {pct:>3}% {:.1} of {:.1} MiB",
                    self.label,
                    "#".repeat(bar),
                    " ".repeat(25 - bar),
                    mib(done),
                    mib(total)
                );
                let _ = self.out.flush();
            }
        } else if let Some(t) = tenth {
            let _ = writeln!(
                self.out,
                "{}: {}% ({:.1} of {:.1} MiB, {:.1}s)",
                self.label,
                t * 10,
                mib(done),
                mib(total),
                self.start.elapsed().as_secs_f64()
            );
        }
    }

    /// Whether every byte of the total was counted.
    pub fn is_done(&self) -> bool {
        self.tenths.done() >= self.tenths.total()
    }

    /// Ends the bar's line on a terminal (once).
    pub fn finish(&mut self) {
        if self.terminal && self.shown_percent.take().is_some() {
            let _ = writeln!(self.out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_tenth_off_a_terminal() {
        let mut out = Vec::new();
        let mut p = Progress::new("import x.db", 1000, &mut out, false);
        for _ in 0..100 {
            p.add(10);
        }
        p.finish();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 10, "{text}");
        assert!(lines[0].starts_with("import x.db: 10% "), "{text}");
        assert!(lines[9].starts_with("import x.db: 100% "), "{text}");
    }

    #[test]
    fn a_bar_redrawn_in_place_on_a_terminal() {
        let mut out = Vec::new();
        let mut p = Progress::new("export", 200, &mut out, true);
        p.add(100);
        p.add(100);
        p.finish();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches('\r').count(), 2, "{text:?}");
        assert!(text.contains(" 50% ") && text.ends_with("100% 0.0 of 0.0 MiB\n"));
    }

    #[test]
    fn big_steps_report_the_highest_tenth_once() {
        let mut t = Tenths::new(100);
        assert_eq!(t.add(5), None);
        assert_eq!(t.add(40), Some(4));
        assert_eq!(t.add(1000), Some(10));
        assert_eq!(t.add(1), None);
    }
}
