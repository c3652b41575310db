//! Progress of long work (a backlog upload, a bundle): one rewritten line on a terminal, plain
//! lines otherwise (logs, pipes, CI) — at most one per tenth of the work, and the last.

use std::io::{IsTerminal, Write};

pub struct Progress {
    label: String,
    out: Box<dyn Write + Send>,
    tty: bool,
    last_percent: Option<u64>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("label", &self.label)
            .field("tty", &self.tty)
            .finish_non_exhaustive()
    }
}

impl Progress {
    /// Progress on standard error, rewritten in place when it is a terminal.
    pub fn new(label: impl Into<String>) -> Self {
        let tty = std::io::stderr().is_terminal();
        Self::to(label, Box::new(std::io::stderr()), tty)
    }

    pub fn to(label: impl Into<String>, out: Box<dyn Write + Send>, tty: bool) -> Self {
        Self {
            label: label.into(),
            out,
            tty,
            last_percent: None,
        }
    }

    /// `done` of `total` units; `detail` says what is done so far (e.g. "3000 events").
    pub fn update(&mut self, done: u64, total: u64, unit: &str, detail: &str) {
        let percent = (done * 100).checked_div(total).unwrap_or(100);
        let line = format!(
            "{}: {done}/{total} {unit} ({percent}%) {detail}",
            self.label
        );
        let line = line.trim_end();
        if self.tty {
            let _ = write!(self.out, "\r{line}\x1b[K");
            if done >= total {
                let _ = writeln!(self.out);
            }
        } else {
            let due = self
                .last_percent
                .is_none_or(|last| percent >= last + 10 || done >= total);
            if due {
                self.last_percent = Some(percent);
                let _ = writeln!(self.out, "{line}");
            }
        }
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn plain_lines_every_tenth_and_the_last_and_a_rewritten_line_on_a_terminal() {
        let out = Shared::default();
        let mut plain = Progress::to("uploading", Box::new(out.clone()), false);
        for done in 1..=100 {
            plain.update(done, 100, "batches", &format!("{} events", done * 1000));
        }
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 11, "{text}");
        assert_eq!(lines[0], "uploading: 1/100 batches (1%) 1000 events");
        assert_eq!(lines[10], "uploading: 100/100 batches (100%) 100000 events");

        let out = Shared::default();
        let mut tty = Progress::to("bundle", Box::new(out.clone()), true);
        tty.update(1, 2, "files", "a.log");
        tty.update(2, 2, "files", "b.log");
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            "\rbundle: 1/2 files (50%) a.log\x1b[K\rbundle: 2/2 files (100%) b.log\x1b[K\n"
        );
    }
}
