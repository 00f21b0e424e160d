//! User and group names from `<root>/etc/passwd` and `<root>/etc/group`.
//!
//! The files are parsed directly (no NSS), so a configurable root can point
//! at a container's or a chroot's files. Only the name and numeric id
//! columns are used; comments, blank lines, NIS compat entries (`+`/`-`)
//! and malformed lines are skipped. When an id appears more than once, the
//! first entry wins, as with `getpwuid(3)` on the files backend.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use hashbrown::HashMap;

/// Largest passwd/group file read, so a hostile file cannot exhaust memory.
pub const MAX_DB_FILE_BYTES: u64 = 16 << 20;

/// Errors loading the user database.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is larger than [`MAX_DB_FILE_BYTES`].
    #[error("{path} is larger than {MAX_DB_FILE_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
}

/// uid → user name and gid → group name.
#[derive(Debug, Clone, Default)]
pub struct UserDb {
    root: PathBuf,
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
    stamps: [Option<SystemTime>; 2],
}

fn read_db(path: &Path) -> Result<(String, Option<SystemTime>), UsersError> {
    let read_err = |source| UsersError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if meta.len() > MAX_DB_FILE_BYTES {
        return Err(UsersError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    let bytes = std::fs::read(path).map_err(read_err)?;
    Ok((
        String::from_utf8_lossy(&bytes).into_owned(),
        meta.modified().ok(),
    ))
}

/// Parses `name:x:id:...` lines (column 3 is the uid in passwd and the gid
/// in group) into id → name.
pub fn parse_id_names(text: &str) -> HashMap<u32, String> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let line = line.trim_end();
        if line.is_empty()
            || line.starts_with('#')
            || line.starts_with('+')
            || line.starts_with('-')
        {
            continue;
        }
        let mut cols = line.split(':');
        let (Some(name), Some(_), Some(id)) = (cols.next(), cols.next(), cols.next()) else {
            continue;
        };
        if name.is_empty() {
            continue;
        }
        if let Ok(id) = id.parse::<u32>() {
            out.entry(id).or_insert_with(|| name.to_string());
        }
    }
    out
}

impl UserDb {
    /// Loads `<root>/etc/passwd` and `<root>/etc/group`.
    pub fn load(root: impl AsRef<Path>) -> Result<Self, UsersError> {
        let mut db = UserDb {
            root: root.as_ref().to_path_buf(),
            ..UserDb::default()
        };
        db.reload()?;
        Ok(db)
    }

    /// An empty database (every lookup misses).
    pub fn empty() -> Self {
        UserDb::default()
    }

    fn paths(&self) -> [PathBuf; 2] {
        [self.root.join("etc/passwd"), self.root.join("etc/group")]
    }

    /// Re-reads both files.
    pub fn reload(&mut self) -> Result<(), UsersError> {
        let [p, g] = self.paths();
        let (pt, ps) = read_db(&p)?;
        let (gt, gs) = read_db(&g)?;
        self.users = parse_id_names(&pt);
        self.groups = parse_id_names(&gt);
        self.stamps = [ps, gs];
        Ok(())
    }

    /// Re-reads the files when their modification time changed; returns
    /// whether it did.
    pub fn reload_if_changed(&mut self) -> Result<bool, UsersError> {
        if self.root.as_os_str().is_empty() {
            return Ok(false);
        }
        let now: Vec<Option<SystemTime>> = self
            .paths()
            .iter()
            .map(|p| std::fs::metadata(p).ok().and_then(|m| m.modified().ok()))
            .collect();
        if now[..] == self.stamps[..] {
            return Ok(false);
        }
        self.reload()?;
        Ok(true)
    }

    /// Name of a user id.
    pub fn user(&self, uid: u32) -> Option<&str> {
        self.users.get(&uid).map(String::as_str)
    }

    /// Name of a group id.
    pub fn group(&self, gid: u32) -> Option<&str> {
        self.groups.get(&gid).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/bash
# a comment

daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
vagrant:x:1000:1000:,,,:/home/vagrant:/bin/bash
dup:x:1000:1000::/home/dup:/bin/sh
+nisuser::::::
broken-line
bad:x:notanumber:1::/:/bin/sh
";
    const GROUP: &str = "\
root:x:0:
daemon:x:1:
vagrant:x:1000:
docker:x:998:vagrant
";

    fn fixture() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/passwd"), PASSWD).unwrap();
        std::fs::write(dir.path().join("etc/group"), GROUP).unwrap();
        dir
    }

    #[test]
    fn loads_fixture_files() {
        let dir = fixture();
        let db = UserDb::load(dir.path()).unwrap();
        assert_eq!(db.user(0), Some("root"));
        assert_eq!(db.user(1000), Some("vagrant"), "first entry wins");
        assert_eq!(db.user(1), Some("daemon"));
        assert_eq!(db.user(4242), None);
        assert_eq!(db.group(998), Some("docker"));
        assert_eq!(db.group(1000), Some("vagrant"));
        assert_eq!(db.group(5), None);
    }

    #[test]
    fn reload_picks_up_changes() {
        let dir = fixture();
        let mut db = UserDb::load(dir.path()).unwrap();
        assert!(!db.reload_if_changed().unwrap());
        let passwd = dir.path().join("etc/passwd");
        std::fs::write(&passwd, "alice:x:2000:2000::/home/alice:/bin/sh\n").unwrap();
        // Force a distinct mtime even on coarse-grained filesystems.
        let f = std::fs::File::options().write(true).open(&passwd).unwrap();
        f.set_modified(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(12345))
            .unwrap();
        assert!(db.reload_if_changed().unwrap());
        assert_eq!(db.user(2000), Some("alice"));
        assert_eq!(db.user(0), None);
    }

    #[test]
    fn missing_file_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = UserDb::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("etc/passwd"), "{err}");
    }
}
