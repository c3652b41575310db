//! Consent receipts (SPEC C3): each consent version is stated in a canonical JSON payload signed with
//! the service's Ed25519 key, so anyone holding the published public key can verify it offline. The
//! payload's exact form is documented on `sightline.consent.v1.ConsentReceipt`.

use std::path::Path;

use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use sightline_runtime::secret_file;

use crate::domain::{Consent, Sharing, Usage};

pub const RECEIPT_TYPE: &str = "sightline.consent.receipt.v1";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("receipt key file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("receipt key file {path} does not hold an Ed25519 PKCS#8 key")]
    Invalid { path: String },
}

/// The service's signing key.
pub struct ReceiptSigner {
    key_pair: Ed25519KeyPair,
    key_id: String,
}

impl std::fmt::Debug for ReceiptSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiptSigner")
            .field("key_id", &self.key_id)
            .finish()
    }
}

impl ReceiptSigner {
    /// Loads the PKCS#8 key at `path`, or generates one there (mode 0600) on first start.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            path: path.display().to_string(),
            source,
        };
        let pkcs8 = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let generated =
                    Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| {
                        KeyError::Invalid {
                            path: path.display().to_string(),
                        }
                    })?;
                secret_file::create_private(path, generated.as_ref()).map_err(io)?;
                generated.as_ref().to_vec()
            }
            Err(e) => return Err(io(e)),
        };
        let key_pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| KeyError::Invalid {
            path: path.display().to_string(),
        })?;
        let key_id = key_id(key_pair.public_key().as_ref());
        Ok(Self { key_pair, key_id })
    }

    pub fn public_key(&self) -> &[u8] {
        self.key_pair.public_key().as_ref()
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn sign(&self, payload: &[u8]) -> Vec<u8> {
        self.key_pair.sign(payload).as_ref().to_vec()
    }

    pub fn verifies(&self, payload: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, self.public_key())
            .verify(payload, signature)
            .is_ok()
    }
}

/// Lower-case hex of the first 8 bytes of SHA-256(public key).
pub fn key_id(public_key: &[u8]) -> String {
    hex::encode(&Sha256::digest(public_key)[..8])
}

/// What a receipt states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement<'a> {
    pub org_id: &'a str,
    pub version: i64,
    pub consent: Consent,
    pub actor: &'a str,
    pub reason: &'a str,
    pub created_at_ms: i64,
    pub key_id: &'a str,
}

fn json(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// The canonical payload: compact JSON, keys in the documented order.
pub fn payload(s: &Statement<'_>) -> Vec<u8> {
    format!(
        "{{\"type\":{},\"org_id\":{},\"version\":{},\"usage_level\":{},\"sharing_level\":{},\"contribute_metadata\":{},\"contribute_in_app_data\":{},\"compliance_restricted\":{},\"actor\":{},\"reason\":{},\"created_at_ms\":{},\"key_id\":{}}}",
        json(RECEIPT_TYPE),
        json(s.org_id),
        s.version,
        json(s.consent.usage.name()),
        json(s.consent.sharing.name()),
        s.consent.contribute_metadata,
        s.consent.contribute_in_app_data,
        s.consent.compliance_restricted,
        json(s.actor),
        json(s.reason),
        s.created_at_ms,
        json(s.key_id),
    )
    .into_bytes()
}

/// A payload read back.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Parsed {
    #[serde(rename = "type")]
    pub kind: String,
    pub org_id: String,
    pub version: i64,
    pub usage_level: String,
    pub sharing_level: String,
    pub contribute_metadata: bool,
    pub contribute_in_app_data: bool,
    pub compliance_restricted: bool,
    pub actor: String,
    pub reason: String,
    pub created_at_ms: i64,
    pub key_id: String,
}

impl Parsed {
    pub fn read(payload: &[u8]) -> Option<Self> {
        let parsed: Parsed = serde_json::from_slice(payload).ok()?;
        (parsed.kind == RECEIPT_TYPE).then_some(parsed)
    }

    pub fn consent(&self) -> Option<Consent> {
        Some(Consent {
            usage: Usage::from_name(&self.usage_level)?,
            sharing: Sharing::from_name(&self.sharing_level)?,
            contribute_metadata: self.contribute_metadata,
            contribute_in_app_data: self.contribute_in_app_data,
            compliance_restricted: self.compliance_restricted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_a_canonical_payload_that_reads_back_and_verifies() {
        let dir = sightline_runtime::testing::private_tempdir().unwrap();
        let path = dir.path().join("receipt.key");
        let signer = ReceiptSigner::load_or_create(&path).unwrap();
        let again = ReceiptSigner::load_or_create(&path).unwrap();
        assert_eq!(signer.public_key(), again.public_key(), "the key persists");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let statement = Statement {
            org_id: "org-1",
            version: 3,
            consent: Consent {
                usage: Usage::Advanced,
                ..Consent::DEFAULT
            },
            actor: "admin:t1",
            reason: "quote \" and newline\n",
            created_at_ms: 1_800_000_000_000,
            key_id: signer.key_id(),
        };
        let bytes = payload(&statement);
        assert!(bytes.starts_with(b"{\"type\":\"sightline.consent.receipt.v1\",\"org_id\":\"org-1\",\"version\":3,\"usage_level\":\"ADVANCED\""));
        let signature = signer.sign(&bytes);
        assert_eq!(signature.len(), 64);
        assert!(signer.verifies(&bytes, &signature));
        let mut flipped = bytes.clone();
        flipped[40] ^= 1;
        assert!(!signer.verifies(&flipped, &signature));
        let parsed = Parsed::read(&bytes).unwrap();
        assert_eq!(parsed.reason, "quote \" and newline\n");
        assert_eq!(parsed.consent().unwrap().usage, Usage::Advanced);
    }
}
