//! The session's log file: `rigd.log`, rolled into numbered parts.

use std::path::{Path, PathBuf};

use super::{log_file_name, LOG_FILE};

/// A session's `rigd.log`, rolled to `rigd.001.log`, `rigd.002.log`, ... when
/// the open part would grow past a size limit. Nothing is deleted: every
/// part is session data (and listed in the manifest). The tracing layer
/// writes one whole event per `write`, so a part ends at a line end.
#[derive(Debug)]
pub struct SessionLogFile {
    dir: PathBuf,
    file: std::fs::File,
    /// Bytes in the open part.
    bytes: u64,
    /// Number of the open part (0 = `rigd.log`).
    part: u32,
    max_bytes: u64,
}

impl SessionLogFile {
    /// Open (append to) `dir/rigd.log`; parts roll over past `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        let path = dir.join(LOG_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let bytes = file.metadata()?.len();
        Ok(Self {
            dir: dir.to_owned(),
            file,
            bytes,
            part: 0,
            max_bytes: max_bytes.max(1),
        })
    }

    /// Close the open part (synced) and start the next free one.
    fn roll(&mut self) -> std::io::Result<()> {
        let mut part = self.part;
        let file = loop {
            part = part
                .checked_add(1)
                .ok_or_else(|| std::io::Error::other("no log part number left"))?;
            let path = self.dir.join(log_file_name(part));
            match std::fs::OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(path)
            {
                Ok(f) => break f,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        };
        let _ = self.file.sync_data();
        self.file = file;
        self.part = part;
        self.bytes = 0;
        Ok(())
    }
}

impl std::io::Write for SessionLogFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes > 0 && self.bytes.saturating_add(buf.len() as u64) > self.max_bytes {
            // If the next part cannot be made, keep writing to this one.
            let _ = self.roll();
        }
        let n = self.file.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write;

    #[test]
    fn the_session_log_rolls_into_numbered_parts_and_keeps_every_line() {
        let dir = std::env::temp_dir().join(format!("rigd-log-roll-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut log = SessionLogFile::open(&dir, 1000).unwrap();
        let lines: Vec<String> = (0..100)
            .map(|i| {
                format!(
                    "2026-01-01T00:00:00Z INFO line {i:03} {}\n",
                    "x".repeat(i % 7)
                )
            })
            .collect();
        for l in &lines {
            log.write_all(l.as_bytes()).unwrap();
        }
        log.flush().unwrap();
        let mut parts = Vec::new();
        for n in 0.. {
            let p = dir.join(log_file_name(n));
            if !p.exists() {
                break;
            }
            parts.push(std::fs::read_to_string(p).unwrap());
        }
        assert!(parts.len() >= 4, "{} parts", parts.len());
        assert_eq!(log_file_name(1), "rigd.001.log");
        for p in &parts {
            assert!(
                p.len() <= 1000 && p.ends_with('\n'),
                "a part of {} bytes",
                p.len()
            );
        }
        assert_eq!(parts.concat(), lines.concat(), "nothing lost or reordered");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
