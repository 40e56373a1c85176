//! Token files: written readable by their owner only, read trimmed, with
//! errors that name the file.

use std::path::Path;

/// Why a token file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// It could not be read.
    #[error("cannot read the token file {path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        error: std::io::Error,
    },
    /// It holds nothing.
    #[error("the token file {0} is empty")]
    Empty(String),
}

/// Writes `token` to `path` with mode 0600, atomically (a temporary file
/// renamed over it).
pub fn write(path: &Path, token: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(format!("{token}\n").as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Reads a token from `path`, trimmed.
pub fn read(path: &Path) -> Result<String, SecretError> {
    let text = std::fs::read_to_string(path).map_err(|error| SecretError::Read {
        path: path.display().to_string(),
        error,
    })?;
    let token = text.trim().to_owned();
    if token.is_empty() {
        return Err(SecretError::Empty(path.display().to_string()));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_written_for_the_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("shoal-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admin.token");
        write(&path, "shoal_x").unwrap();
        write(&path, "shoal_y").unwrap();
        assert_eq!(read(&path).unwrap(), "shoal_y");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, "\n").unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("empty"));
        assert!(
            read(&dir.join("missing"))
                .unwrap_err()
                .to_string()
                .contains("missing")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
