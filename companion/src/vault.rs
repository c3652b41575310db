//! The companion's home: the key file, the vault it opens, and the link's public facts.
//!
//! - `companion.key`: 32 random bytes (hex), mode 0600, in the product's shared home directory. The
//!   companion refuses to start when anyone but its owner may read it.
//! - `companion.vault`: the link key and the instance credential, sealed with AES-256-GCM under that
//!   key, a fresh random nonce per write, and the instance id as associated data, so a vault copied
//!   to another instance does not open. Written to a temporary file, synced and renamed: a re-link
//!   replaces it whole or not at all.
//! - `companion.json`: what is not secret (org, instance, endpoints, when the link key expires).

use std::io::Write;
use std::path::{Path, PathBuf};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use sightline_runtime::Secret;

const MAGIC: &[u8; 4] = b"SLV1";
const AAD_PREFIX: &[u8] = b"sightline-companion-vault/1\0";

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error(
        "the vault {0} cannot be opened: it was altered, copied from another instance, or sealed with another key file; link again (sightline-companion link)"
    )]
    Unopenable(PathBuf),
    #[error(
        "the key file {path} may be read by others (mode {mode:o}); it must be private: chmod 600 {path}"
    )]
    KeyFileOpen { path: String, mode: u32 },
    #[error("the key file {0} is not a companion key (64 hex characters)")]
    KeyFileInvalid(PathBuf),
    #[error("this companion is not linked yet: run sightline-companion link (no {0})")]
    NotLinked(PathBuf),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    State(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> VaultError {
    let context = context.into();
    move |source| VaultError::Io { context, source }
}

/// The files of one companion, under its home directory.
#[derive(Debug, Clone)]
pub struct Home {
    pub dir: PathBuf,
}

impl Home {
    /// Opens (or makes, mode 0700) the home directory; refuses one others may read.
    pub fn open(dir: &Path) -> Result<Self, VaultError> {
        sightline_runtime::secret_file::private_dir(dir)
            .map_err(io(format!("companion home {}", dir.display())))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }
    pub fn key_file(&self) -> PathBuf {
        self.dir.join("companion.key")
    }
    pub fn vault_file(&self) -> PathBuf {
        self.dir.join("companion.vault")
    }
    pub fn state_file(&self) -> PathBuf {
        self.dir.join("companion.json")
    }
    pub fn status_file(&self) -> PathBuf {
        self.dir.join("status.json")
    }
    pub fn spool_dir(&self) -> PathBuf {
        self.dir.join("analytics-logs")
    }
}

/// The secrets the vault keeps.
#[derive(Serialize, Deserialize)]
pub struct Secrets {
    pub link_key: String,
    pub credential: String,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets { .. }")
    }
}

impl Secrets {
    pub fn credential(&self) -> Secret {
        Secret::new(self.credential.clone())
    }
}

/// Where the services are.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoints {
    pub linker: String,
    pub consent: String,
    pub collector: String,
    pub insights: String,
    /// PEM CA certificates to trust for https:// endpoints (the system roots are not used).
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

/// What the link established, not secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkState {
    pub org_id: String,
    pub instance_id: String,
    pub server_id: String,
    pub base_url: String,
    pub product: String,
    pub version: String,
    pub link_key_id: String,
    pub link_key_prefix: String,
    /// Milliseconds since the epoch.
    pub link_key_expires_at_ms: i64,
    pub linked_at_ms: i64,
    pub endpoints: Endpoints,
}

/// Reads the key, refusing a key file others may read. Makes one (0600) when `create` and it is
/// missing.
pub fn load_key(home: &Home, create: bool) -> Result<[u8; 32], VaultError> {
    let path = home.key_file();
    match std::fs::metadata(&path) {
        Ok(meta) => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(VaultError::KeyFileOpen {
                        path: path.display().to_string(),
                        mode,
                    });
                }
            }
            let _ = meta;
            let text = std::fs::read_to_string(&path)
                .map_err(io(format!("key file {}", path.display())))?;
            let bytes =
                hex::decode(text.trim()).map_err(|_| VaultError::KeyFileInvalid(path.clone()))?;
            bytes
                .try_into()
                .map_err(|_| VaultError::KeyFileInvalid(path.clone()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            let mut key = [0u8; 32];
            SystemRandom::new()
                .fill(&mut key)
                .map_err(|_| VaultError::State("no randomness for the key file".into()))?;
            sightline_runtime::secret_file::create_private(
                &path,
                format!("{}\n", hex::encode(key)).as_bytes(),
            )
            .map_err(io(format!("key file {}", path.display())))?;
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(VaultError::NotLinked(path)),
        Err(e) => Err(io(format!("key file {}", path.display()))(e)),
    }
}

fn aad(instance_id: &str) -> Vec<u8> {
    let mut aad = AAD_PREFIX.to_vec();
    aad.extend_from_slice(instance_id.as_bytes());
    aad
}

fn sealing_key(key: &[u8; 32]) -> Result<LessSafeKey, VaultError> {
    UnboundKey::new(&AES_256_GCM, key)
        .map(LessSafeKey::new)
        .map_err(|_| VaultError::State("the key file's key is unusable".into()))
}

/// Seals `secrets` for `instance_id`: MAGIC, a random nonce, then ciphertext and tag.
pub fn seal(key: &[u8; 32], instance_id: &str, secrets: &Secrets) -> Result<Vec<u8>, VaultError> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| VaultError::State("no randomness for a nonce".into()))?;
    let mut body = serde_json::to_vec(secrets).map_err(|e| VaultError::State(e.to_string()))?;
    sealing_key(key)?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(instance_id)),
            &mut body,
        )
        .map_err(|_| VaultError::State("sealing the vault failed".into()))?;
    let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Opens a sealed vault. Any change to any byte, another instance id or another key: one error.
pub fn unseal(
    key: &[u8; 32],
    instance_id: &str,
    sealed: &[u8],
    path: &Path,
) -> Result<Secrets, VaultError> {
    let unopenable = || VaultError::Unopenable(path.to_path_buf());
    let rest = sealed.strip_prefix(MAGIC).ok_or_else(unopenable)?;
    if rest.len() < NONCE_LEN {
        return Err(unopenable());
    }
    let (nonce, body) = rest.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| unopenable())?;
    let mut body = body.to_vec();
    let plain = sealing_key(key)?
        .open_in_place(nonce, Aad::from(aad(instance_id)), &mut body)
        .map_err(|_| unopenable())?;
    serde_json::from_slice(plain).map_err(|_| unopenable())
}

/// Writes `bytes` to `path` whole or not at all: a private temporary file, synced, renamed over,
/// and the directory synced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), VaultError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(format!("writing {}", path.display()))(e)
    })
}

/// Keeps a new link: the vault first, then the public facts (the instance id the vault is bound to
/// stays the same across re-links of one server).
pub fn store_link(home: &Home, state: &LinkState, secrets: &Secrets) -> Result<(), VaultError> {
    let key = load_key(home, true)?;
    let sealed = seal(&key, &state.instance_id, secrets)?;
    write_atomic(&home.vault_file(), &sealed)?;
    let json = serde_json::to_vec_pretty(state).map_err(|e| VaultError::State(e.to_string()))?;
    write_atomic(&home.state_file(), &json)
}

/// A file `link` writes: missing means not linked yet.
fn read_linked(path: &Path) -> Result<Vec<u8>, VaultError> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => VaultError::NotLinked(path.to_path_buf()),
        _ => io(format!("reading {}", path.display()))(e),
    })
}

/// The link's public facts, when linked.
pub fn load_state(home: &Home) -> Result<LinkState, VaultError> {
    let path = home.state_file();
    let bytes = read_linked(&path)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| VaultError::State(format!("{} is not a link state: {e}", path.display())))
}

/// Opens the vault of a linked companion: the state, then the key (refused when others may read
/// it), then the secrets.
pub fn open(home: &Home) -> Result<(LinkState, Secrets), VaultError> {
    let state = load_state(home)?;
    let key = load_key(home, false)?;
    let path = home.vault_file();
    let sealed = read_linked(&path)?;
    let secrets = unseal(&key, &state.instance_id, &sealed, &path)?;
    Ok((state, secrets))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn secrets() -> Secrets {
        Secrets {
            link_key: "slk_example".into(),
            credential: "slc_example".into(),
        }
    }

    #[test]
    fn every_flipped_byte_and_another_instance_fail_alike() {
        let key = [7u8; 32];
        let sealed = seal(&key, "inst-1", &secrets()).unwrap();
        let path = Path::new("companion.vault");
        assert_eq!(
            unseal(&key, "inst-1", &sealed, path).unwrap().credential,
            "slc_example"
        );
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(matches!(
                unseal(&key, "inst-1", &bad, path),
                Err(VaultError::Unopenable(_))
            ));
        }
        assert!(matches!(
            unseal(&key, "inst-2", &sealed, path),
            Err(VaultError::Unopenable(_))
        ));
        assert!(matches!(
            unseal(&[8u8; 32], "inst-1", &sealed, path),
            Err(VaultError::Unopenable(_))
        ));
        assert!(matches!(
            unseal(&key, "inst-1", &sealed[..sealed.len() - 1], path),
            Err(VaultError::Unopenable(_))
        ));
    }

    #[test]
    fn each_write_has_its_own_nonce() {
        let key = [7u8; 32];
        let a = seal(&key, "inst-1", &secrets()).unwrap();
        let b = seal(&key, "inst-1", &secrets()).unwrap();
        assert_ne!(a[4..16], b[4..16]);
    }

    #[test]
    fn secrets_never_print() {
        assert_eq!(format!("{:?}", secrets()), "Secrets { .. }");
    }
}
