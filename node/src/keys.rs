//! Loading namespace ID keys: from a directory of Secret files in a cluster, or generated once and
//! kept in the data directory for local development.

use crate::id::{IdKeys, KeyError};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read ID keys of namespace {namespace:?} from {path}: {source}")]
    Read {
        namespace: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("ID keys file {path} line {line}: expected 64 hexadecimal digits")]
    BadLine { path: PathBuf, line: usize },
    #[error("cannot store generated ID keys at {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Parses a keys file: hex keys, one per line, oldest first; blank lines and `#` comments ignored.
pub fn parse_keys(namespace: &str, text: &str, path: &Path) -> Result<IdKeys, KeysError> {
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = hex::decode(line)
            .ok()
            .filter(|k| k.len() == 32)
            .ok_or_else(|| KeysError::BadLine {
                path: path.to_path_buf(),
                line: i + 1,
            })?;
        keys.push(key);
    }
    Ok(IdKeys::new(namespace, keys)?)
}

/// Keys of `namespace` from `dir/<namespace>` (mounted Secrets; must exist).
pub fn load(dir: &Path, namespace: &str) -> Result<IdKeys, KeysError> {
    let path = dir.join(namespace);
    let text = fs::read_to_string(&path).map_err(|source| KeysError::Read {
        namespace: namespace.to_string(),
        path: path.clone(),
        source,
    })?;
    parse_keys(namespace, &text, &path)
}

/// Keys of `namespace` from `dir/<namespace>`, generating and durably storing a first key when
/// there is none yet (local development).
pub fn load_or_generate(dir: &Path, namespace: &str) -> Result<IdKeys, KeysError> {
    let path = dir.join(namespace);
    if !path.exists() {
        let write = |path: &Path| -> std::io::Result<()> {
            crate::storage::dirs::create_dir_all_durable(dir)?;
            let tmp = path.with_extension("tmp");
            let mut f = fs::File::create(&tmp)?;
            writeln!(
                f,
                "# ID keys of namespace {namespace}: oldest first; never remove or reorder lines"
            )?;
            writeln!(f, "{}", hex::encode(IdKeys::generate_key()))?;
            f.sync_all()?;
            fs::rename(&tmp, path)?;
            fs::File::open(dir)?.sync_all()
        };
        write(&path).map_err(|source| KeysError::Write {
            path: path.clone(),
            source,
        })?;
    }
    load(dir, namespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_files_parse_with_comments_and_reject_bad_lines() {
        let k = "ab".repeat(32);
        let text = format!("# comment\n\n{k}\n{}\n", "cd".repeat(32));
        assert!(parse_keys("ns", &text, Path::new("f")).is_ok());
        let err = parse_keys("ns", "zz\n", Path::new("f")).expect_err("bad");
        assert!(err.to_string().contains("line 1"), "{err}");
        assert!(parse_keys("ns", "# nothing\n", Path::new("f")).is_err());
    }

    #[test]
    fn generated_keys_persist() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = load_or_generate(dir.path(), "chat").expect("generated");
        let b = load_or_generate(dir.path(), "chat").expect("loaded");
        assert_eq!(a.from_name("x", None), b.from_name("x", None));
    }
}
