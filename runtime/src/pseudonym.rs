//! Keyed pseudonyms: the one construction every service uses for FIELD_ACTION_KEYED_HASH
//! (documented in `common.proto`), so collector-svc, insights-svc and EraseViewer compute the same
//! pseudonym for the same value.
//!
//! ```text
//! org_key = HKDF-SHA256(ikm = secret, salt = "sightline.pseudonym.v1", info = org id)   32 bytes
//! mac     = HMAC-SHA256(org_key, CLASS || 0x00 || value)
//! text    = "psn" || version || "_" || hex(mac[..16])
//! ```
//!
//! The secret (32 random bytes, hex in a 0600 file under the data directory) never leaves the
//! service side; per-org keys are derived once and reused for every value.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use sha2_11::Sha256;
use sightline_proto::common::v1::DataClass;

use crate::secret_file;

const SALT: &[u8] = b"sightline.pseudonym.v1";

/// The pseudonymization secret of one key version.
#[derive(Clone)]
pub struct PseudonymSecret {
    version: u32,
    secret: [u8; 32],
}

impl std::fmt::Debug for PseudonymSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PseudonymSecret")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// The file that holds the secret of `version` under a data directory.
pub fn secret_path(data_dir: &Path, version: u32) -> std::path::PathBuf {
    data_dir.join(format!("pseudonym-v{version}.key"))
}

impl PseudonymSecret {
    pub fn new(version: u32, secret: [u8; 32]) -> Self {
        Self { version, secret }
    }

    /// Reads the secret at `path`, or makes one there (mode 0600) when the file does not exist.
    pub fn load_or_create(path: &Path, version: u32) -> io::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let bytes = hex::decode(text.trim()).map_err(|_| bad_file())?;
                let secret: [u8; 32] = bytes.try_into().map_err(|_| bad_file())?;
                Ok(Self::new(version, secret))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let secret: [u8; 32] = rand::random();
                secret_file::create_private(path, format!("{}\n", hex::encode(secret)).as_bytes())?;
                Ok(Self::new(version, secret))
            }
            Err(e) => Err(e),
        }
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// The key of one org: derive it once and keep it for every value of that org.
    pub fn org_key(&self, org_id: &str) -> OrgPseudonymizer {
        let mut key = [0u8; 32];
        // 32 bytes is far below HKDF-SHA256's limit of 8160, so expand cannot fail.
        let _ = Hkdf::<Sha256>::new(Some(SALT), &self.secret).expand(org_id.as_bytes(), &mut key);
        OrgPseudonymizer {
            version: self.version,
            key,
        }
    }
}

fn bad_file() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "pseudonym key file does not hold 32 hex-encoded bytes",
    )
}

/// Computes one org's pseudonyms.
#[derive(Clone)]
pub struct OrgPseudonymizer {
    version: u32,
    key: [u8; 32],
}

impl std::fmt::Debug for OrgPseudonymizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrgPseudonymizer")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl OrgPseudonymizer {
    /// The pseudonym of `value` of `class`, e.g. `psn1_3f8a…` (32 hex digits).
    pub fn pseudonym(&self, class: DataClass, value: &str) -> String {
        let name = class.as_str_name().trim_start_matches("DATA_CLASS_");
        // HMAC takes keys of any length.
        let mut mac = match <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key) {
            Ok(mac) => mac,
            Err(_) => unreachable_key(),
        };
        mac.update(name.as_bytes());
        mac.update(&[0]);
        mac.update(value.as_bytes());
        let tag = mac.finalize().into_bytes();
        format!("psn{}_{}", self.version, hex::encode(&tag[..16]))
    }
}

#[allow(clippy::panic)]
fn unreachable_key() -> ! {
    panic!("HMAC-SHA256 accepts keys of any length")
}

/// The pseudonymization secrets, one per key version, from the data directory.
#[derive(Debug)]
pub struct PseudonymKeys {
    data_dir: PathBuf,
    loaded: Mutex<HashMap<u32, PseudonymSecret>>,
}

impl PseudonymKeys {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            loaded: Mutex::new(HashMap::new()),
        }
    }

    /// The org's key for `version`; None (and KEYED_HASH fields are dropped) when the secret cannot
    /// be read or made.
    pub fn org_key(&self, version: u32, org_id: &str) -> Option<OrgPseudonymizer> {
        let version = version.max(1);
        let mut loaded = self.loaded.lock().ok()?;
        if let Some(secret) = loaded.get(&version) {
            return Some(secret.org_key(org_id));
        }
        let path = secret_path(&self.data_dir, version);
        match PseudonymSecret::load_or_create(&path, version) {
            Ok(secret) => {
                let key = secret.org_key(org_id);
                loaded.insert(version, secret);
                Some(key)
            }
            Err(error) => {
                tracing::error!(%error, version, "pseudonymization secret unavailable");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_construction_matches_its_documented_test_vector() {
        // Secret 00 01 … 1f, org "0190a000-0000-7000-8000-000000000001", USER_ID "u-42": computed
        // independently with Python's hmac and cryptography's HKDF (see tests/python).
        let secret: [u8; 32] = std::array::from_fn(|i| i as u8);
        let org = PseudonymSecret::new(1, secret).org_key("0190a000-0000-7000-8000-000000000001");
        let p = org.pseudonym(DataClass::UserId, "u-42");
        assert_eq!(
            p,
            include_str!("../../tests/python/pseudonym_vector.txt").trim()
        );
        assert_eq!(p.len(), 37);
        assert!(p.starts_with("psn1_"));
    }

    #[test]
    fn pseudonyms_differ_by_org_class_and_value_and_are_stable() {
        let secret = PseudonymSecret::new(1, [7; 32]);
        let a = secret.org_key("org-a");
        let b = secret.org_key("org-b");
        let x = a.pseudonym(DataClass::UserId, "alice");
        assert_eq!(
            x,
            secret
                .org_key("org-a")
                .pseudonym(DataClass::UserId, "alice")
        );
        assert_ne!(x, b.pseudonym(DataClass::UserId, "alice"));
        assert_ne!(x, a.pseudonym(DataClass::Username, "alice"));
        assert_ne!(x, a.pseudonym(DataClass::UserId, "alicf"));
        assert!(!format!("{secret:?}{a:?}").contains("7, 7"));
    }

    #[test]
    fn the_secret_file_is_private_and_reused() {
        let dir = tempfile::Builder::new()
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir()
            .unwrap();
        let path = secret_path(dir.path(), 1);
        let made = PseudonymSecret::load_or_create(&path, 1).unwrap();
        let again = PseudonymSecret::load_or_create(&path, 1).unwrap();
        assert_eq!(made.secret, again.secret);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "nope").unwrap();
        assert!(PseudonymSecret::load_or_create(&path, 1).is_err());
    }
}
