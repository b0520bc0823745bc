//! Test-only: a filesystem over [`SimFs`] whose reads of chosen byte ranges fail with EIO, as
//! unreadable sectors do after they were written (writes are not affected).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::fault::SimFs;
use super::fs::{FileSystem, WalFile};

type Regions = Arc<Mutex<Vec<(PathBuf, u64, u64)>>>;

#[derive(Clone)]
pub struct BadReads {
    pub sim: SimFs,
    unreadable: Regions,
}

impl BadReads {
    pub fn new(sim: SimFs) -> BadReads {
        BadReads {
            sim,
            unreadable: Arc::default(),
        }
    }

    /// Every later read touching `[from, from + len)` of `path` fails with EIO.
    pub fn make_unreadable(&self, path: &Path, from: u64, len: u64) {
        self.unreadable
            .lock()
            .unwrap()
            .push((path.to_path_buf(), from, from + len));
    }

    /// Every region reads again (a transient error that went away).
    pub fn clear_unreadable(&self) {
        self.unreadable.lock().unwrap().clear();
    }

    fn wrap(&self, path: &Path, file: Arc<dyn WalFile>) -> Arc<dyn WalFile> {
        Arc::new(BadReadsFile {
            inner: file,
            path: path.to_path_buf(),
            unreadable: self.unreadable.clone(),
        })
    }
}

struct BadReadsFile {
    inner: Arc<dyn WalFile>,
    path: PathBuf,
    unreadable: Regions,
}

impl WalFile for BadReadsFile {
    fn read_exact_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buffer.len() as u64;
        let hit = self
            .unreadable
            .lock()
            .unwrap()
            .iter()
            .any(|(path, from, to)| *path == self.path && offset < *to && *from < end);
        if hit {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.read_exact_at(buffer, offset)
    }

    fn write_all_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_all_at(bytes, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.inner.sync_data()
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        self.inner.allocate(len)
    }

    fn byte_len(&self) -> io::Result<u64> {
        self.inner.byte_len()
    }
}

impl FileSystem for BadReads {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.sim.create_dir_all(dir)
    }

    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn WalFile>> {
        Ok(self.wrap(path, self.sim.create_new(path)?))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn WalFile>> {
        Ok(self.wrap(path, self.sim.open(path)?))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.sim.remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.sim.rename(from, to)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.sim.list(dir)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.sim.sync_dir(dir)
    }
}
