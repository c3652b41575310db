//! The web console against the whole stack as processes (`sightline up`, console included), driven
//! by a real browser (headless Chromium through Playwright: tests/browser/walkthrough.py) and by a
//! plain HTTP client that tries to break its security (tests/browser/security.py). Afterwards the
//! stack's log is scanned for every secret the scripts handled.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sightline_tests::{companion_binary, form_post, http, sightline_binary};

/// `sightline up` on ephemeral ports, logging JSON at info to a file.
struct Up {
    /// Killed when the test ends, however it ends.
    _child: sightline_runtime::testing::Reaped,
    dir: tempfile::TempDir,
    addrs: Vec<(String, String)>,
}

impl Up {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("stack.log")).unwrap();
        let mut command = Command::new(sightline_binary());
        command
            .args(["up", "--data-dir"])
            .arg(dir.path().join("data"))
            .env("SIGHTLINE_LOG__FORMAT", "json")
            .env("SIGHTLINE_LOG__LEVEL", "info")
            .env("SIGHTLINE_COLLECTION__ROLLUP_EVERY_MS", "300")
            .env("SIGHTLINE_ANALYSIS__SCORE_EVERY_MS", "1000");
        for service in ["LINKER", "CONSENT", "COLLECTOR", "INSIGHTS", "CONSOLE"] {
            command.env(format!("SIGHTLINE_{service}__LISTEN"), "127.0.0.1:0");
            if service != "CONSOLE" {
                command.env(format!("SIGHTLINE_{service}__METRICS_LISTEN"), "off");
            }
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .map(sightline_runtime::testing::Reaped)
            .unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut addrs = Vec::new();
        let mut banner = String::new();
        loop {
            let mut line = String::new();
            assert!(
                stdout.read_line(&mut line).unwrap() > 0,
                "sightline up exited early:\n{banner}"
            );
            banner.push_str(&line);
            let mut words = line.split_whitespace();
            if let (Some(name), Some(addr)) = (words.next(), words.next())
                && ["linker", "consent", "collector", "insights", "console"].contains(&name)
            {
                addrs.push((name.to_owned(), addr.to_owned()));
            }
            if line.contains("sightline-companion --home ./companion run") {
                break;
            }
        }
        // The rest of the banner is never read; drain it so the stack never blocks on it.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        Self {
            _child: child,
            dir,
            addrs,
        }
    }

    fn addr(&self, name: &str) -> &str {
        &self
            .addrs
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} is not in the banner: {:?}", self.addrs))
            .1
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stack.log")).unwrap()
    }

    /// Runs tests/browser/`script` against this stack; its work files go in `work`.
    fn run_script(&self, script: &str, work: &Path) {
        let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser");
        let out = Command::new("python3")
            .arg(scripts.join(script))
            .current_dir(&scripts)
            .env("CONSOLE_URL", self.addr("console"))
            .env("LINKER_ADDR", self.addr("linker"))
            .env("CONSENT_ADDR", self.addr("consent"))
            .env("COLLECTOR_ADDR", self.addr("collector"))
            .env("INSIGHTS_ADDR", self.addr("insights"))
            .env(
                "OPERATOR_TOKEN_FILE",
                self.dir.path().join("data/operator.token"),
            )
            .env("COMPANION", companion_binary())
            .env(
                "ASSESSMENT",
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/assessment.json"),
            )
            .env("WORK", work)
            .env("SCREENSHOTS", screenshots())
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script} failed\nstdout:\n{}\nstderr:\n{}\nstack log (last 4000 bytes):\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log(), 4000)
        );
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }

    /// No secret the script handled is in the stack's log, nor in what the companion logged.
    fn assert_no_secret_logged(&self, work: &Path) {
        let secrets: serde_json::Value =
            serde_json::from_slice(&std::fs::read(work.join("secrets.json")).unwrap()).unwrap();
        let mut logs = self.log();
        if let Ok(companion) = std::fs::read_to_string(work.join("companion-run.log")) {
            logs.push_str(&companion);
        }
        let mut count = 0;
        for kind in ["signin", "issued"] {
            for secret in secrets[kind].as_array().unwrap() {
                let secret = secret.as_str().unwrap();
                assert!(secret.len() > 20, "{secret:?} is not a secret");
                assert!(!logs.contains(secret), "a {kind} secret is in a log");
                count += 1;
            }
        }
        assert!(count >= 3, "{count} secrets checked");
        assert!(logs.lines().count() > 20, "the stack logged: {logs}");
    }
}

fn tail(text: &str, bytes: usize) -> &str {
    let mut start = text.len().saturating_sub(bytes);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Where the browser test saves its screenshots (docs/console holds a few of them, committed).
fn screenshots() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots")
}

#[test]
fn an_operator_and_an_admin_do_their_days_work_in_a_real_browser() {
    let up = Up::start();
    let work = tempfile::tempdir().unwrap();
    up.run_script("walkthrough.py", work.path());
    up.assert_no_secret_logged(work.path());
}

#[test]
fn the_console_refuses_forged_changes_escapes_markup_and_keeps_tokens_to_itself() {
    let up = Up::start();
    let work = tempfile::tempdir().unwrap();
    up.run_script("security.py", work.path());
    up.assert_no_secret_logged(work.path());
}

/// `sightline console` alone, its services down (port 9), with `extra` settings.
async fn console_alone(
    data: &Path,
    extra: &[(&str, &str)],
) -> (tokio::process::Child, std::net::SocketAddr) {
    let env: Vec<(String, String)> = ["LINKER", "CONSENT", "COLLECTOR", "INSIGHTS"]
        .iter()
        .map(|s| {
            (
                format!("SIGHTLINE_{s}__URL"),
                "http://127.0.0.1:9".to_owned(),
            )
        })
        .chain([(
            "SIGHTLINE_CONSOLE__LISTEN".to_owned(),
            "127.0.0.1:0".to_owned(),
        )])
        .chain(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
        .collect();
    let mut child = tokio::process::Command::new(sightline_binary())
        .arg("console")
        .arg("--data-dir")
        .arg(data.join("data"))
        .envs(env)
        .env("SIGHTLINE_LOG__FORMAT", "json")
        .env("SIGHTLINE_LOG__LEVEL", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (addr, _) = sightline_tests::listening_addrs("console", &mut child, false).await;
    (child, addr)
}

fn sign_in_request(token: &str) -> String {
    form_post("/signin", &format!("token={token}"))
}

/// `sightline console` alone, with every service it calls down: sign-in answers a page that says a
/// service is unavailable (503), never a stack trace, and the console keeps serving.
#[tokio::test]
async fn with_the_services_down_the_console_says_so_on_a_page() {
    let data = tempfile::tempdir().unwrap();
    let (_child, addr) = console_alone(data.path(), &[]).await;
    let token = sightline_runtime::token::generate(sightline_runtime::token::TokenKind::Admin);
    for _ in 0..3 {
        let answer = http(addr, &sign_in_request(&token)).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("A service is unavailable"), "{answer}");
        assert!(
            answer.contains("<span class=\"code\">UNAVAILABLE</span>"),
            "{answer}"
        );
        assert!(
            !answer.contains("sla_aaaa"),
            "the pasted token is not echoed"
        );
        assert!(!answer.to_lowercase().contains("panick"), "{answer}");
    }
    let home = http(
        addr,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(home.starts_with("HTTP/1.1 303"), "{home}");
    assert!(
        home.contains("content-security-policy: default-src 'none'"),
        "{home}"
    );
}

/// A connection that opens and sends nothing, or only part of a request's headers, is closed after
/// `console.header_timeout_ms`; the console goes on serving others.
#[tokio::test]
async fn a_stalled_connection_is_closed_and_others_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let data = tempfile::tempdir().unwrap();
    let (_child, addr) = console_alone(
        data.path(),
        &[("SIGHTLINE_CONSOLE__HEADER_TIMEOUT_MS", "300")],
    )
    .await;
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(addr).await.unwrap();
    partial
        .write_all(b"GET /signin HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Closed by the server: the read ends (a bound far past the setting, never reached).
    for stream in [&mut silent, &mut partial] {
        let mut buf = Vec::new();
        let ended = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            stream.read_to_end(&mut buf),
        )
        .await;
        assert!(ended.is_ok(), "a stalled connection stayed open");
    }
    let page = http(
        addr,
        "GET /signin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
}

/// An address that keeps pasting tokens nobody knows is refused (429) once its failure budget is
/// spent, before linker-svc is asked.
#[tokio::test]
async fn a_flood_of_bad_sign_ins_runs_out_of_budget() {
    let data = tempfile::tempdir().unwrap();
    let (_child, addr) = console_alone(
        data.path(),
        &[
            ("SIGHTLINE_LIMITS__AUTH_FAILURE_BURST", "3"),
            ("SIGHTLINE_LIMITS__AUTH_FAILURES_PER_SECOND", "1"),
        ],
    )
    .await;
    let mut refused = 0;
    for i in 0..50 {
        let answer = http(addr, &sign_in_request(&format!("sla_guess{i}"))).await;
        assert!(
            answer.starts_with("HTTP/1.1 401") || answer.starts_with("HTTP/1.1 429"),
            "{answer}"
        );
        if answer.starts_with("HTTP/1.1 429") {
            assert!(
                answer.contains("too many failed authentications"),
                "{answer}"
            );
            refused += 1;
        }
    }
    // 50 attempts spend a budget of 3 plus 1 a second unless they took most of a minute.
    assert!(refused > 0, "no attempt was refused");
}
