//! Private files under the data directory: the directory itself is 0700 and refused when others can
//! read it; secrets are created once with mode 0600 and never overwritten; database files are 0600.

use std::io::{self, Write};
use std::path::Path;

use crate::settings::Secret;
use crate::token::{self, TokenKind};

/// Makes `dir` (mode 0700, whatever the umask) when it does not exist; refuses one that others can
/// read, write or enter: it holds tokens' digests, base URLs, license numbers and audit logs.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a directory", dir.display()),
        )),
        Ok(meta) => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "data directory {} is open to other users (mode {mode:o}); run: chmod 700 {}",
                            dir.display(),
                            dir.display()
                        ),
                    ));
                }
            }
            let _ = meta;
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::DirBuilderExt;
                builder.mode(0o700);
            }
            builder.create(dir)?;
            restrict(dir, 0o700)
        }
        Err(e) => Err(e),
    }
}

/// Makes a database file (and its `-wal`/`-shm` companions, if present) readable by the owner only,
/// creating the main file empty when it does not exist, so SQLite never makes it with the umask's
/// mode (SQLite gives the companions the main file's mode).
pub fn private_database_file(path: &Path) -> io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)?;
    restrict(path, 0o600)?;
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut companion = path.as_os_str().to_owned();
        companion.push(suffix);
        let companion = std::path::PathBuf::from(companion);
        if companion.exists() {
            restrict(&companion, 0o600)?;
        }
    }
    Ok(())
}

fn restrict(path: &Path, mode: u32) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    let _ = (path, mode);
    Ok(())
}

/// Creates `path` (and its directory) readable by the owner only, writes `contents` and syncs.
/// Fails if the file exists: a secret is never replaced behind its owner's back.
pub fn create_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        private_dir(parent)?;
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

/// Reads a token of `kind` from `path`, which must exist and hold one.
pub fn read_token(path: &Path, kind: TokenKind) -> io::Result<Secret> {
    let text = std::fs::read_to_string(path)?;
    let text = text.trim();
    if token::parse(text).is_ok_and(|p| p.kind == kind) {
        Ok(Secret::new(text))
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("file does not hold a {}", kind.noun()),
        ))
    }
}

/// Reads the token of `kind` at `path`, or makes one there when the file does not exist. Returns the
/// token and whether it was created. The token itself is never printed or logged.
pub fn read_or_create_token(path: &Path, kind: TokenKind) -> io::Result<(Secret, bool)> {
    match read_token(path, kind) {
        Ok(existing) => Ok((existing, false)),
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
        let dir = tempfile::Builder::new()
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir()
            .unwrap();
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

    #[cfg(unix)]
    #[test]
    fn a_data_directory_is_made_private_and_one_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::Builder::new()
            .permissions(PermissionsExt::from_mode(0o700))
            .tempdir()
            .unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let data = parent.path().join("a/b/data");
        private_dir(&data).unwrap();
        assert_eq!(mode(&data), 0o700);
        private_dir(&data).unwrap();
        for open in [0o750, 0o705, 0o777] {
            std::fs::set_permissions(&data, PermissionsExt::from_mode(open)).unwrap();
            let refused = private_dir(&data).unwrap_err();
            assert_eq!(refused.kind(), io::ErrorKind::PermissionDenied);
            assert!(refused.to_string().contains("chmod 700"), "{refused}");
        }
        std::fs::set_permissions(&data, PermissionsExt::from_mode(0o700)).unwrap();
        // A database file left 0644 by an older version, and its WAL, are made 0600.
        let db = data.join("linker.db");
        std::fs::write(&db, b"").unwrap();
        std::fs::write(data.join("linker.db-wal"), b"").unwrap();
        std::fs::set_permissions(&db, PermissionsExt::from_mode(0o644)).unwrap();
        private_database_file(&db).unwrap();
        assert_eq!(mode(&db), 0o600);
        assert_eq!(mode(&data.join("linker.db-wal")), 0o600);
    }
}
