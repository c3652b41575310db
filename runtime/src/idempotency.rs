//! Idempotency keys for mutations a client may retry after a timeout: the client's `request_id`,
//! stored only as a SHA-256 digest; a retry within the window gets the first answer back. An answer
//! that holds a secret (a new link key, an admin token) is kept *sealed*: ChaCha20-Poly1305 under a
//! key derived by HKDF-SHA256 from the request id, which the server does not keep — so the stored
//! answer is unreadable to anyone who does not hold the request id, and secrets stay digest-only.

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf::{HKDF_SHA256, Salt};
use sha2::{Digest, Sha256};

/// How long a first answer is kept for retries.
pub const WINDOW_MS: i64 = 24 * 60 * 60 * 1000;

const SALT: &[u8] = b"sightline.idempotency.v1";

/// Checks a request id: empty (none), or 22 to 64 characters of [A-Za-z0-9_-].
pub fn parse(value: &str) -> Result<Option<&str>, &'static str> {
    if value.is_empty() {
        return Ok(None);
    }
    if !(22..=64).contains(&value.len())
        || !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
    {
        return Err(
            "must be 22 to 64 characters of A-Z, a-z, 0-9, '_' and '-' (at least 128 random bits)",
        );
    }
    Ok(Some(value))
}

/// What is stored to find a request again: the lower-case hex SHA-256 of its id.
pub fn request_key(request_id: &str) -> String {
    hex::encode(Sha256::digest(request_id.as_bytes()))
}

fn key(request_id: &str) -> Option<LessSafeKey> {
    let prk = Salt::new(HKDF_SHA256, SALT).extract(request_id.as_bytes());
    let okm = prk.expand(&[b"seal"], &CHACHA20_POLY1305).ok()?;
    Some(LessSafeKey::new(UnboundKey::from(okm)))
}

/// Seals `answer` for `request_id`; `context` (e.g. method and org) is bound as associated data.
pub fn seal(request_id: &str, context: &[u8], answer: &[u8]) -> Option<Vec<u8>> {
    let key = key(request_id)?;
    let nonce_bytes: [u8; NONCE_LEN] = rand::random();
    let mut sealed = answer.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce_bytes),
        Aad::from(context),
        &mut sealed,
    )
    .ok()?;
    let mut out = nonce_bytes.to_vec();
    out.extend_from_slice(&sealed);
    Some(out)
}

/// Opens what [`seal`] made, or None when the id, the context or the bytes do not match.
pub fn open(request_id: &str, context: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    let key = key(request_id)?;
    let (nonce, body) = sealed.split_at_checked(NONCE_LEN)?;
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let mut body = body.to_vec();
    let plain = key
        .open_in_place(nonce, Aad::from(context), &mut body)
        .ok()?;
    Some(plain.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "Jx8nQe2v_T0aPZk3LmR7wA";

    #[test]
    fn request_ids_are_long_and_plain() {
        assert_eq!(parse("").unwrap(), None);
        assert_eq!(parse(ID).unwrap(), Some(ID));
        assert!(parse("short").is_err());
        assert!(parse(&"a".repeat(65)).is_err());
        assert!(parse("Jx8nQe2v T0aPZk3LmR7wA!").is_err());
        assert_eq!(request_key(ID).len(), 64);
        assert_ne!(request_key(ID), request_key("Jx8nQe2v_T0aPZk3LmR7wB"));
    }

    #[test]
    fn a_sealed_answer_opens_only_with_its_id_and_context() {
        let sealed = seal(ID, b"CreateLinkKey/org-a", b"slk_secret").unwrap();
        assert!(!sealed.windows(10).any(|w| w == b"slk_secret"));
        assert_eq!(
            open(ID, b"CreateLinkKey/org-a", &sealed).unwrap(),
            b"slk_secret"
        );
        assert!(open("Jx8nQe2v_T0aPZk3LmR7wB", b"CreateLinkKey/org-a", &sealed).is_none());
        assert!(open(ID, b"CreateLinkKey/org-b", &sealed).is_none());
        let mut flipped = sealed.clone();
        flipped[20] ^= 1;
        assert!(open(ID, b"CreateLinkKey/org-a", &flipped).is_none());
        assert!(open(ID, b"x", &[1, 2]).is_none());
    }
}
