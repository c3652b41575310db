//! The one format of every secret Sightline issues: `<kind prefix>_<32 base62 random><6 base62 CRC32>`.
//!
//! 32 characters drawn uniformly from 62 give 190 bits of randomness. The checksum, CRC32 of everything
//! before it, lets a scanner recognise a leaked secret and makes a mistyped one fail before any lookup:
//! CRC32 catches every single-byte change, and the checksum's own characters are positional.
//! Secrets are stored only as SHA-256 digests ([`digest`]), compared in constant time ([`digests_equal`]).

use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const RANDOM_LEN: usize = 32;
const CHECKSUM_LEN: usize = 6;
/// How many characters of a secret are shown back as its recognisable prefix.
const DISPLAY_RANDOM_CHARS: usize = 4;

/// What a secret is for; each kind has its own prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKind {
    Operator,
    Admin,
    LinkKey,
    Instance,
    Service,
}

impl TokenKind {
    pub const ALL: [TokenKind; 5] = [
        TokenKind::Operator,
        TokenKind::Admin,
        TokenKind::LinkKey,
        TokenKind::Instance,
        TokenKind::Service,
    ];

    pub fn prefix(self) -> &'static str {
        match self {
            TokenKind::Operator => "slo_",
            TokenKind::Admin => "sla_",
            TokenKind::LinkKey => "slk_",
            TokenKind::Instance => "slc_",
            TokenKind::Service => "sls_",
        }
    }

    pub fn noun(self) -> &'static str {
        match self {
            TokenKind::Operator => "operator token",
            TokenKind::Admin => "admin token",
            TokenKind::LinkKey => "link key",
            TokenKind::Instance => "instance credential",
            TokenKind::Service => "service token",
        }
    }
}

/// Why a presented secret was rejected before any lookup.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("unknown token prefix")]
    UnknownPrefix,
    #[error("token has the wrong length")]
    Length,
    #[error("token has characters outside base62")]
    Alphabet,
    #[error("token checksum does not match")]
    Checksum,
}

/// A secret that passed its format and checksum check.
#[derive(Clone, PartialEq, Eq)]
pub struct ParsedToken<'a> {
    pub kind: TokenKind,
    raw: &'a str,
}

impl std::fmt::Debug for ParsedToken<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParsedToken")
            .field("kind", &self.kind)
            .field("prefix", &display_prefix(self.raw))
            .finish()
    }
}

impl ParsedToken<'_> {
    pub fn digest(&self) -> [u8; 32] {
        digest(self.raw)
    }

    pub fn display_prefix(&self) -> String {
        display_prefix(self.raw)
    }
}

/// Makes a new secret of `kind`.
pub fn generate(kind: TokenKind) -> String {
    let random: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(RANDOM_LEN)
        .map(char::from)
        .collect();
    let mut token = String::with_capacity(kind.prefix().len() + RANDOM_LEN + CHECKSUM_LEN);
    token.push_str(kind.prefix());
    token.push_str(&random);
    let checksum = encode_checksum(crc32fast::hash(token.as_bytes()));
    token.push_str(&checksum);
    token
}

/// Checks a presented secret's prefix, length, alphabet and checksum.
pub fn parse(token: &str) -> Result<ParsedToken<'_>, TokenError> {
    let kind = TokenKind::ALL
        .into_iter()
        .find(|k| token.starts_with(k.prefix()))
        .ok_or(TokenError::UnknownPrefix)?;
    let body = &token[kind.prefix().len()..];
    if body.len() != RANDOM_LEN + CHECKSUM_LEN {
        return Err(TokenError::Length);
    }
    if !body.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(TokenError::Alphabet);
    }
    let (signed, checksum) = token.split_at(token.len() - CHECKSUM_LEN);
    if encode_checksum(crc32fast::hash(signed.as_bytes())) != checksum {
        return Err(TokenError::Checksum);
    }
    Ok(ParsedToken { kind, raw: token })
}

/// SHA-256 of a secret: the only form in which it is stored.
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

pub fn digests_equal(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// The part of a secret shown in listings, e.g. `slk_Ab3x`: the kind and four random characters.
pub fn display_prefix(secret: &str) -> String {
    secret
        .char_indices()
        .nth(4 + DISPLAY_RANDOM_CHARS)
        .map_or_else(|| secret.to_owned(), |(i, _)| secret[..i].to_owned())
}

fn encode_checksum(mut value: u32) -> String {
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(value % 62) as usize];
        value /= 62;
    }
    out.iter().map(|&b| char::from(b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn generated_tokens_parse_with_their_kind() {
        for kind in TokenKind::ALL {
            let token = generate(kind);
            assert_eq!(token.len(), 4 + RANDOM_LEN + CHECKSUM_LEN);
            assert_eq!(parse(&token).map(|p| p.kind), Ok(kind));
        }
    }

    #[test]
    fn rejects_wrong_prefix_length_and_alphabet() {
        let token = generate(TokenKind::LinkKey);
        assert_eq!(
            parse(&token.replacen("slk_", "xyz_", 1)),
            Err(TokenError::UnknownPrefix)
        );
        assert_eq!(parse(&token[..token.len() - 1]), Err(TokenError::Length));
        let mut bad = token.clone();
        bad.replace_range(10..11, "-");
        assert_eq!(parse(&bad), Err(TokenError::Alphabet));
    }

    #[test]
    fn display_prefix_shows_kind_and_four_characters() {
        let token = generate(TokenKind::Admin);
        assert_eq!(display_prefix(&token), &token[..8]);
        assert!(display_prefix(&token).starts_with("sla_"));
    }

    proptest! {
        /// The checksum rejects every single-character change of a key.
        #[test]
        fn checksum_rejects_every_single_character_change(
            position in 0usize..(4 + RANDOM_LEN + CHECKSUM_LEN),
            replacement in proptest::char::any(),
        ) {
            let key = generate(TokenKind::LinkKey);
            let mut chars: Vec<char> = key.chars().collect();
            prop_assume!(chars[position] != replacement);
            chars[position] = replacement;
            let changed: String = chars.into_iter().collect();
            prop_assert!(parse(&changed).is_err(), "accepted {changed:?} from {key:?}");
        }
    }

    #[test]
    fn checksum_rejects_every_base62_substitution_exhaustively() {
        let key = generate(TokenKind::LinkKey);
        for position in 4..key.len() {
            for &c in BASE62 {
                let mut bytes = key.clone().into_bytes();
                if bytes[position] == c {
                    continue;
                }
                bytes[position] = c;
                let changed = String::from_utf8(bytes).unwrap();
                assert_eq!(parse(&changed), Err(TokenError::Checksum), "{changed}");
            }
        }
    }
}
