//! A generator of personal data and of the ways it gets written, for the door's property tests
//! (`tests/door.rs`): e-mail addresses (plus-addressing, IDN), IPv4 and IPv6 in their textual
//! forms, display names and usernames, each put through up to three encodings that a browser, a
//! JSON or HTML writer or a form produces (percent, form, JSON escapes and JSON held in JSON, HTML
//! numeric and named references, base64, base64url, hex). [`Pii::leaks`] says whether text still
//! holds the value in any form: as written, in any of the encodings it was planted in, or once the
//! text is decoded.

use base64::Engine;
use proptest::prelude::*;
use proptest::strategy::BoxedStrategy;

/// One piece of personal data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pii {
    Email(String),
    Ip(String),
    /// A display name: findable only in an event that carries it in its own field.
    DisplayName(String),
    /// A username: findable only in an event that carries it in its own field.
    Username(String),
}

impl Pii {
    pub fn value(&self) -> &str {
        match self {
            Pii::Email(v) | Pii::Ip(v) | Pii::DisplayName(v) | Pii::Username(v) => v,
        }
    }

    /// Whether it can be known for what it is without the event naming it (e-mails and IPs).
    pub fn is_self_evident(&self) -> bool {
        matches!(self, Pii::Email(_) | Pii::Ip(_))
    }

    /// The strings whose presence in stored text means the value leaked.
    fn needles(&self) -> Vec<String> {
        let value = self.value().to_lowercase();
        let mut needles = vec![value.clone()];
        match self {
            Pii::Email(v) => {
                // The local part alone is the person (the canaries' local parts are distinctive).
                if let Some((local, _)) = v.split_once('@') {
                    needles.push(local.to_lowercase());
                }
            }
            Pii::Ip(v) => {
                if let Ok(ip) = v.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
                    needles.push(ip.to_string().to_lowercase());
                    if let std::net::IpAddr::V6(v6) = ip {
                        let full: Vec<String> =
                            v6.segments().iter().map(|s| format!("{s:04x}")).collect();
                        needles.push(full.join(":"));
                    }
                }
            }
            Pii::DisplayName(_) | Pii::Username(_) => {
                for sep in ["+", "_", ".", "%20", "-"] {
                    needles.push(value.replace(' ', sep));
                }
            }
        }
        needles
    }

    /// Whether `text` (stored, previewed or returned) holds this value in any form: as written,
    /// as any of `planted`, or once decoded.
    pub fn leaks(&self, text: &Haystack, planted: &[String]) -> bool {
        let found = |hay: &str, needle: &str| {
            memchr::memmem::find(hay.as_bytes(), needle.as_bytes()).is_some()
        };
        self.needles()
            .iter()
            .any(|n| found(&text.lower, n) || found(&text.decoded, n))
            || planted
                .iter()
                .filter(|p| p.len() >= 6)
                .any(|p| found(&text.raw, p))
    }
}

/// Text to search, prepared once: as it is, lower-cased, and decoded (lower-cased).
#[derive(Debug)]
pub struct Haystack {
    raw: String,
    lower: String,
    decoded: String,
}

impl Haystack {
    pub fn new(text: &str) -> Self {
        Self {
            raw: text.to_owned(),
            lower: text.to_lowercase(),
            decoded: sightline_runtime::scrub::decode(text).to_lowercase(),
        }
    }
}

/// An encoding as a writer produces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `encodeURIComponent`: every byte but letters and digits as `%XX`.
    Percent,
    /// A form: spaces as `+`, the rest as `%XX`.
    Form,
    /// A JSON string with every non-alphanumeric character as `\uXXXX`.
    JsonEscape,
    /// The text as a JSON object held in a JSON string (`{\"v\":\"…\"}`): escapes escaped.
    JsonInJson,
    /// Numeric character references for every non-alphanumeric character.
    HtmlNumeric,
    /// Named character references (`&commat;`, `&period;`, `&colon;` …).
    HtmlNamed,
    /// Base64 of a small JSON blob holding the text.
    Base64Json,
    /// Base64url, no padding.
    Base64Url,
    Hex,
}

impl Encoding {
    pub const ALL: [Encoding; 9] = [
        Encoding::Percent,
        Encoding::Form,
        Encoding::JsonEscape,
        Encoding::JsonInJson,
        Encoding::HtmlNumeric,
        Encoding::HtmlNamed,
        Encoding::Base64Json,
        Encoding::Base64Url,
        Encoding::Hex,
    ];

    pub fn apply(self, text: &str) -> String {
        match self {
            Encoding::Percent => percent(text, false),
            Encoding::Form => percent(text, true),
            Encoding::JsonEscape => json_escape(text),
            Encoding::JsonInJson => {
                let inner = format!("{{\"v\":\"{}\"}}", json_escape(text));
                inner.replace('\\', "\\\\").replace('"', "\\\"")
            }
            Encoding::HtmlNumeric => text
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_string()
                    } else {
                        format!("&#{};", u32::from(c))
                    }
                })
                .collect(),
            Encoding::HtmlNamed => text
                .chars()
                .map(|c| match c {
                    '@' => "&commat;".to_owned(),
                    '.' => "&period;".to_owned(),
                    ':' => "&colon;".to_owned(),
                    ' ' => "&nbsp;".to_owned(),
                    '+' => "&plus;".to_owned(),
                    '-' => "&hyphen;".to_owned(),
                    '_' => "&lowbar;".to_owned(),
                    '%' => "&percnt;".to_owned(),
                    '&' => "&amp;".to_owned(),
                    '[' => "&lsqb;".to_owned(),
                    ']' => "&rsqb;".to_owned(),
                    other => other.to_string(),
                })
                .collect(),
            Encoding::Base64Json => base64::engine::general_purpose::STANDARD
                .encode(format!("{{\"u\":\"{text}\",\"n\":1}}")),
            Encoding::Base64Url => base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text),
            Encoding::Hex => hex::encode(text),
        }
    }
}

fn percent(text: &str, form: bool) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(char::from(b));
        } else if form && b == b' ' {
            out.push('+');
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn json_escape(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

/// `value` through each of `encodings` in turn, with every intermediate form (for [`Pii::leaks`]).
pub fn plant(value: &str, encodings: &[Encoding]) -> (String, Vec<String>) {
    let mut forms = vec![value.to_owned()];
    let mut text = value.to_owned();
    for encoding in encodings {
        text = encoding.apply(&text);
        forms.push(text.clone());
    }
    (text, forms)
}

fn alnum(min: usize, max: usize) -> BoxedStrategy<String> {
    proptest::string::string_regex(&format!("[a-z][a-z0-9]{{{min},{max}}}"))
        .expect("a valid pattern")
        .boxed()
}

fn ipv6() -> BoxedStrategy<String> {
    (any::<[u16; 8]>(), 0..6u8)
        .prop_map(|(segments, form)| {
            let mut segments = segments;
            // Addresses with runs of zeros, as real ones have (compression).
            segments[3] = 0;
            segments[4] = 0;
            segments[0] |= 0x2000;
            let ip = std::net::Ipv6Addr::from(segments);
            match form {
                0 => ip.to_string(),
                1 => ip.to_string().to_uppercase(),
                2 => segments
                    .iter()
                    .map(|s| format!("{s:04x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
                3 => format!("[{ip}]:8443"),
                4 => format!("fe80::{:x}:{:x}%eth0", segments[6], segments[7]),
                _ => format!(
                    "::ffff:{}.{}.{}.{}",
                    segments[6] >> 8,
                    segments[6] & 0xff,
                    segments[7] >> 8,
                    (segments[7] & 0xff).max(1)
                ),
            }
        })
        .boxed()
}

/// Any piece of personal data, with distinctive parts (so finding one is never a coincidence).
pub fn pii() -> BoxedStrategy<Pii> {
    prop_oneof![
        (alnum(4, 8), alnum(2, 6), 0..4u8).prop_map(|(local, tag, form)| {
            Pii::Email(match form {
                0 => format!("zq{local}@{tag}host.example"),
                1 => format!("zq{local}+{tag}@host.example"),
                2 => format!("zq{local}.mä{tag}@bücher{tag}.example"),
                _ => format!("ZQ{}@{tag}.HOST.example", local.to_uppercase()),
            })
        }),
        (1..=254u8, 0..=255u8, 0..=255u8, 1..=254u8)
            .prop_map(|(a, b, c, d)| Pii::Ip(format!("{a}.{b}.{c}.{d}"))),
        ipv6().prop_map(Pii::Ip),
        (alnum(3, 7), alnum(3, 7)).prop_map(|(first, last)| {
            let cap = |s: &str| {
                let mut c = s.chars();
                c.next()
                    .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                    .unwrap_or_default()
            };
            Pii::DisplayName(format!("Zq{} {}", cap(&first), cap(&last)))
        }),
        alnum(4, 8).prop_map(|u| Pii::Username(format!("zqu{u}"))),
    ]
    .boxed()
}

/// One to three encodings.
pub fn encodings() -> BoxedStrategy<Vec<Encoding>> {
    proptest::collection::vec(proptest::sample::select(Encoding::ALL.to_vec()), 0..=3).boxed()
}
