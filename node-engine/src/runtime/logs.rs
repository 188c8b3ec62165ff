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
