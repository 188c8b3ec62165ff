//! Deploys in progress, on disk: a file per instance id while its deploy runs (`<data-dir>/deploying/`),
//! holding how many times a deploy of it has started without finishing. A NodeEngine that dies during a
//! deploy (a crash, the OOM killer, a power cut) finds the file when the cluster sends the deploy again;
//! after [`MAX_INTERRUPTED`] such interruptions the instance fails with the reason instead of being tried
//! into a crash loop.

use std::path::PathBuf;

use anyhow::Context;

/// Deploys of one instance that may be interrupted before the next one is refused.
pub const MAX_INTERRUPTED: u32 = 2;

#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    pub fn open(data_dir: &std::path::Path) -> anyhow::Result<Self> {
        let dir = data_dir.join("deploying");
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self { dir })
    }

    fn file(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Records that a deploy of `id` starts; returns how many earlier ones were interrupted.
    pub fn begin(&self, id: &str) -> anyhow::Result<u32> {
        let f = self.file(id);
        let interrupted: u32 = std::fs::read_to_string(&f).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        std::fs::write(&f, (interrupted + 1).to_string()).with_context(|| format!("writing {}", f.display()))?;
        Ok(interrupted)
    }

    /// The deploy of `id` finished (started, failed or refused): nothing to remember.
    pub fn end(&self, id: &str) {
        let _ = std::fs::remove_file(self.file(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_interrupted_deploys_until_one_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.begin("a.instance.0").unwrap(), 0);
        // the process died here; a new one opens the same journal
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.begin("a.instance.0").unwrap(), 1);
        assert_eq!(j.begin("a.instance.0").unwrap(), 2);
        j.end("a.instance.0");
        assert_eq!(j.begin("a.instance.0").unwrap(), 0);
        assert_eq!(j.begin("b.instance.0").unwrap(), 0, "per instance");
    }
}
