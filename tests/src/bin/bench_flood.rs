//! Memory under floods: 200k random link keys and 200k unknown tokens to linker-svc and consent-svc
//! (four chunks, after three warm-up chunks of the same size) must not grow the process beyond a
//! bound: what is kept per key or token is bounded (moka caches with a capacity, limiter buckets
//! forgotten when idle). Resident memory depends on the machine's pace (how many entries of a
//! bounded cache are live at once), so this is a benchmark, not a test; the bounds themselves are
//! properties the unit tests check (entries never exceed the caps).
//!
//! cargo run --release -p sightline-tests --bin bench_flood -- [--calls 50000] [--bound-mib 5]
//! (exit status 1 when the growth is over the bound)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use sightline_proto::consent::v1 as consent_pb;
use sightline_proto::consent::v1::consent_service_client::ConsentServiceClient;
use sightline_runtime::settings::Limits;
use sightline_tests::bench::arg;
use sightline_tests::{LinkerOptions, TestConsent, TestLinker, authed};
use tonic::transport::Channel;

const USAGE: &str = "usage: bench_flood [--calls N] [--bound-mib M]
  Floods linker-svc and consent-svc with random link keys and unknown tokens in chunks of N calls
  (default 50000) and exits 1 when the process grows by more than M MiB (default 5).";

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    sightline_tests::bench::command_line(USAGE, &[("--calls", true), ("--bound-mib", true)]);
    let calls = arg("--calls", 50_000) as usize;
    let bound = arg("--bound-mib", 5) as f64;
    if !measure(calls, bound).await {
        std::process::exit(1);
    }
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap();
    kb * 1024
}

/// Sends `calls` calls over `channels`, each with a new random secret of `kind`: link keys to
/// LinkInstance, other tokens to linker-svc (`to_linker`) or consent-svc.
async fn flood(
    channels: &[Channel],
    kind: sightline_runtime::token::TokenKind,
    to_linker: bool,
    calls: usize,
) {
    use sightline_proto::linker::v1 as linker_pb;
    let mut tasks = Vec::new();
    for channel in channels {
        let per_channel = calls / channels.len();
        let channel = channel.clone();
        tasks.push(tokio::spawn(async move {
            let mut linker =
                linker_pb::linker_service_client::LinkerServiceClient::new(channel.clone());
            let mut consent = ConsentServiceClient::new(channel);
            for _ in 0..per_channel {
                let secret = sightline_tests::stranger(kind);
                let _ = if kind == sightline_runtime::token::TokenKind::LinkKey {
                    linker
                        .link_instance(authed(&secret, linker_pb::LinkInstanceRequest::default()))
                        .await
                        .map(drop)
                } else if to_linker {
                    linker
                        .list_link_keys(authed(&secret, linker_pb::ListLinkKeysRequest::default()))
                        .await
                        .map(drop)
                } else {
                    consent
                        .get_receipt_key(authed(&secret, consent_pb::GetReceiptKeyRequest {}))
                        .await
                        .map(drop)
                };
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

async fn channels(addr: SocketAddr, n: usize) -> Vec<Channel> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    out
}

async fn measure(chunk_calls: usize, bound_mib: f64) -> bool {
    use sightline_runtime::token::TokenKind;
    // A failure budget no flood reaches, so every key and token gets as far as the caches and
    // limiters that could keep it (the budget itself is tested apart).
    let limits = Limits {
        auth_failure_burst: 100_000_000,
        auth_failures_per_second: 100_000_000,
        ..Limits::default()
    };
    let linker = TestLinker::start(LinkerOptions {
        quiet: true,
        limits,
        ..LinkerOptions::default()
    })
    .await;
    let consent = TestConsent::start(&linker, None, limits).await;
    let (to_linker, to_consent) = (
        channels(linker.addr, 16).await,
        channels(consent.addr, 16).await,
    );
    // Three rounds bring pools, buffers and allocator arenas to their working size (a loaded machine
    // needs the third: the live entries of a bounded cache depend on the pace); then 200k random
    // link keys and 200k unknown tokens to each service (four chunks) must not grow the process:
    // what is kept per key or token is bounded.
    let round = |calls: usize| {
        let (to_linker, to_consent) = (to_linker.clone(), to_consent.clone());
        async move {
            flood(&to_linker, TokenKind::LinkKey, true, calls).await;
            flood(&to_linker, TokenKind::Admin, true, calls).await;
            flood(&to_consent, TokenKind::Admin, false, calls).await;
        }
    };
    // Warm-up chunks of the same size as the measured ones: bounded caches and pools reach the
    // steady state of this load (a bounded cache holds more entries under a larger chunk).
    for _ in 0..3 {
        round(chunk_calls).await;
    }
    let before = rss_bytes();
    for chunk in 0..4 {
        round(chunk_calls).await;
        eprintln!(
            "after chunk {chunk}: {:+.1} MiB",
            (rss_bytes() as f64 - before as f64) / 1_048_576.0
        );
    }
    let grown = rss_bytes().saturating_sub(before) as f64 / 1_048_576.0;
    let calls = 4 * chunk_calls;
    println!(
        "RSS grew {grown:.1} MiB across {calls} random link keys and {calls} unknown tokens to each service (bound {bound_mib} MiB)"
    );
    grown <= bound_mib
}
