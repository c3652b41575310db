//! Secrets kept in files under the data directory: created once with mode 0600, never overwritten.

use std::io::{self, Write};
use std::path::Path;

use crate::settings::Secret;
use crate::token::{self, TokenKind};

/// Creates `path` (and its directory) readable by the owner only, writes `contents` and syncs.
/// Fails if the file exists: a secret is never replaced behind its owner's back.
pub fn create_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Reads the token of `kind` at `path`, or makes one there when the file does not exist. Returns the
/// token and whether it was created. The token itself is never printed or logged.
pub fn read_or_create_token(path: &Path, kind: TokenKind) -> io::Result<(Secret, bool)> {
    match std::fs::read_to_string(path) {
        Ok(existing) => {
            let existing = existing.trim();
            if token::parse(existing).is_ok_and(|p| p.kind == kind) {
                Ok((Secret::new(existing), false))
            } else {
                Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("file does not hold a {}", kind.noun()),
                ))
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let secret = token::generate(kind);
            create_private(path, format!("{secret}\n").as_bytes())?;
            Ok((Secret::new(secret), true))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_is_made_once_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/operator.token");
        let (made, created) = read_or_create_token(&path, TokenKind::Operator).unwrap();
        assert!(created);
        let (read, created) = read_or_create_token(&path, TokenKind::Operator).unwrap();
        assert!(!created);
        assert_eq!(made, read);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let wrong = read_or_create_token(&path, TokenKind::Service).unwrap_err();
        assert_eq!(wrong.kind(), io::ErrorKind::InvalidData);
        assert!(create_private(&path, b"x").is_err(), "never overwritten");
    }
}
