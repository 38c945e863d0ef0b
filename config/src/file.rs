//! Files an edge keeps next to its config (the operator state file, the
//! fleet cache): written so that a crash leaves the old content or the new,
//! never a mix.

use std::{io::Write as _, path::Path};

/// Replaces `path` with `body` atomically and durably: written to a
/// temporary file in the same directory, synced, renamed over `path`, and
/// the directory synced so the rename survives a power cut. On error the
/// temporary file is removed and `path` is untouched.
pub fn write_atomic(path: &Path, body: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary_behind() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("state.json");
        write_atomic(&p, b"one").expect("first");
        write_atomic(&p, b"two").expect("second");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("state.json");
        write_atomic(&p, b"old").expect("write");
        // The target is now a non-empty directory: the rename fails.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir_all(blocked.join("x")).expect("dir");
        assert!(write_atomic(&blocked, b"new").is_err());
        assert_eq!(std::fs::read(&p).expect("read"), b"old");
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("list").count(),
            2,
            "no temporary left"
        );
    }
}
