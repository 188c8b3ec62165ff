//! Instance logs: a task's stdout and stderr, a VM's serial console, one file per instance id.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// The folder of the log files.
#[derive(Debug, Clone)]
pub struct Logs {
    dir: PathBuf,
}

impl Logs {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The log file of instance `id`.
    pub fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.log"))
    }

    /// The end of instance `id`'s log, as reported with every state.
    pub fn tail(&self, id: &str) -> String {
        tail_file(&self.path(id), 4096)
    }
}

/// The most a logs request returns at once.
pub const MAX_CHUNK: u32 = 1 << 20;

impl Logs {
    /// Up to `max` bytes (at most [`MAX_CHUNK`]) of instance `id`'s log from byte `offset` (negative: the last
    /// `max` bytes); returns where they start, the log's size now, and the bytes.
    pub fn read(&self, id: &str, offset: i64, max: u32) -> std::io::Result<(u64, u64, Vec<u8>)> {
        let mut f = std::fs::File::open(self.path(id))?;
        let size = f.metadata()?.len();
        let max = u64::from(max.clamp(1, MAX_CHUNK));
        let start = if offset < 0 { size.saturating_sub(max) } else { (offset as u64).min(size) };
        f.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        f.take(max).read_to_end(&mut buf)?;
        Ok((start, size, buf))
    }
}

/// Last `max` bytes of a file, lossily decoded.
pub fn tail_file(path: &Path, max: u64) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_from_an_offset_or_the_end_and_follows() {
        let d = tempfile::tempdir().unwrap();
        let logs = Logs::new(d.path().to_path_buf());
        std::fs::write(logs.path("a"), b"0123456789").unwrap();
        assert_eq!(logs.read("a", 2, 3).unwrap(), (2, 10, b"234".to_vec()));
        assert_eq!(logs.read("a", -1, 4).unwrap(), (6, 10, b"6789".to_vec()));
        // past the end: nothing yet; after more output, the new bytes
        assert_eq!(logs.read("a", 10, 100).unwrap(), (10, 10, Vec::new()));
        std::fs::write(logs.path("a"), b"0123456789ab").unwrap();
        assert_eq!(logs.read("a", 10, 100).unwrap(), (10, 12, b"ab".to_vec()));
        assert!(logs.read("missing", 0, 10).is_err());
    }
}
