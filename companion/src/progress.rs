//! Progress of long work (a backlog upload, a bundle): one rewritten line on a terminal, plain
//! lines otherwise (logs, pipes, CI).

use std::io::{IsTerminal, Write};

#[derive(Debug)]
pub struct Progress {
    label: String,
    tty: bool,
    /// Plain lines: print at most one per this share of the work, so a log is not flooded.
    step_percent: u64,
    last_percent: Option<u64>,
}

impl Progress {
    pub fn new(label: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            tty: std::io::stderr().is_terminal(),
            step_percent: 10,
            last_percent: None,
        }
    }

    /// `done` of `total` units; `detail` says what a unit is worth (e.g. "3,000 events").
    pub fn update(&mut self, done: u64, total: u64, unit: &str, detail: &str) {
        let percent = (done * 100).checked_div(total).unwrap_or(100);
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(
                err,
                "\r{}: {done}/{total} {unit} ({percent}%) {detail}\x1b[K",
                self.label
            );
            if done >= total {
                let _ = writeln!(err);
            }
            let _ = err.flush();
        } else {
            let due = self
                .last_percent
                .is_none_or(|last| percent >= last + self.step_percent || done >= total);
            if due {
                self.last_percent = Some(percent);
                let _ = writeln!(
                    err,
                    "{}: {done}/{total} {unit} ({percent}%) {detail}",
                    self.label
                );
            }
        }
    }
}
