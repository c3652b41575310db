//! Nanoseconds per text through the door, for the kinds of text ingest sees most (tag keys and
//! values, metric names, event ids: nothing to find) and for text with something to find.
//! `cargo bench -p sightline-scrub`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use sightline_scrub::{Level, Secrets, Shape, TextRules, first_finding, treat};

fn main() {
    let basic = TextRules::new(Level::Basic, Arc::from(Vec::new()));
    let extended = TextRules::new(Level::Extended, Arc::from(Vec::new()));
    let none = Secrets::default();
    let cases: [(&str, &str); 9] = [
        ("tag key", "pluginKey"),
        ("tag value", "com.atlassian.jira"),
        ("short value", "node-1"),
        ("metric name", "http.server.requests"),
        ("event id", "c0-r12-345"),
        ("sentence", "the scheduler finished its nightly reindex"),
        (
            "url",
            "https://wiki.example/display/OPS/Q3+plan?from=mara%40host.example",
        ),
        ("email", "contact mara.voss@host.example today"),
        ("base64", "d=eyJ1IjoibWFyYS52b3NzQGhvc3QuZXhhbXBsZSJ9"),
    ];
    let rounds = 200_000;
    println!(
        "{:<12} {:>10} {:>10} {:>10}",
        "text", "BASIC ns", "EXT ns", "id ns"
    );
    for (name, text) in cases {
        let time = |f: &dyn Fn()| {
            let start = Instant::now();
            for _ in 0..rounds {
                f();
            }
            start.elapsed().as_nanos() as f64 / f64::from(rounds)
        };
        let b = time(&|| {
            black_box(treat(black_box(text), &none, &basic, Shape::Text));
        });
        let e = time(&|| {
            black_box(treat(black_box(text), &none, &extended, Shape::Text));
        });
        let id = time(&|| {
            black_box(first_finding(black_box(text), &none));
        });
        println!("{name:<12} {b:>10.0} {e:>10.0} {id:>10.0}");
    }
}
