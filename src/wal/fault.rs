//! A fault-injecting, in-memory filesystem for the WAL's tests.
//!
//! Every file keeps two images: what the process sees (the page cache) and what is durable (on
//! the platter). `sync_data` makes a file's image durable; `sync_dir` makes the directory's
//! namespace (creations, renames, removals) durable. [`SimFs::power_loss`] returns the
//! filesystem as it would be after a crash: each 512-byte sector written since the file's last
//! sync independently survives or reverts (the kernel writes dirty pages back in any order), and
//! each namespace change since the directory's last sync survives or not.
//!
//! Faults are armed with [`SimFs::arm`]: the n-th call of an operation from now fails with EIO
//! or ENOSPC, and a write may be torn (only a prefix reaches the page cache).
//! [`SimFs::make_unreadable`] turns a byte range of a file into bad sectors: every read that
//! touches it fails with EIO (until a write touches it, as a drive remaps a rewritten sector).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::fs::{FileSystem, WalFile};

const SECTOR: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    Write,
    Sync,
    Allocate,
    Create,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Eio,
    NoSpace,
    /// The write stops after this many bytes and fails with EIO.
    TornWrite(usize),
}

#[derive(Debug, Clone, Copy)]
pub struct Fault {
    pub op: FaultOp,
    /// Calls of `op` to let through before this one fails.
    pub after: usize,
    pub kind: FaultKind,
    /// Keep failing every later call of `op` too (a disk that stays full or broken).
    pub sticky: bool,
}

#[derive(Default)]
struct FileImage {
    visible: Vec<u8>,
    durable: Vec<u8>,
    /// `[from, to)` ranges that cannot be read (bad sectors); they survive a power loss.
    unreadable: Vec<(usize, usize)>,
}

type SharedFile = Arc<Mutex<FileImage>>;

#[derive(Default)]
struct State {
    /// The namespace the process sees.
    visible: BTreeMap<PathBuf, SharedFile>,
    /// The namespace as it is durable, per file path.
    durable: BTreeMap<PathBuf, SharedFile>,
    dirs: Vec<PathBuf>,
    faults: Vec<Fault>,
    calls: HashMap<u8, usize>,
}

#[derive(Clone, Default)]
pub struct SimFs {
    state: Arc<Mutex<State>>,
}

fn error(kind: FaultKind) -> io::Error {
    match kind {
        FaultKind::NoSpace => io::Error::from_raw_os_error(libc::ENOSPC),
        FaultKind::Eio | FaultKind::TornWrite(_) => io::Error::from_raw_os_error(libc::EIO),
    }
}

impl SimFs {
    pub fn new() -> SimFs {
        SimFs::default()
    }

    pub fn arm(&self, fault: Fault) {
        let mut state = self.state.lock().unwrap();
        let done = state.calls.get(&(fault.op as u8)).copied().unwrap_or(0);
        state.faults.push(Fault {
            after: done + fault.after,
            ..fault
        });
    }

    pub fn disarm(&self) {
        self.state.lock().unwrap().faults.clear();
    }

    /// The fault (if any) that the call of `op` happening now must suffer.
    fn check(&self, op: FaultOp) -> Option<FaultKind> {
        let mut state = self.state.lock().unwrap();
        let count = state.calls.entry(op as u8).or_insert(0);
        let call = *count;
        *count += 1;
        let position = state
            .faults
            .iter()
            .position(|f| f.op == op && (call == f.after || (f.sticky && call >= f.after)))?;
        let fault = state.faults[position];
        if !fault.sticky {
            state.faults.remove(position);
        }
        Some(fault.kind)
    }

    /// The filesystem after a power loss at this instant (see the module doc).
    pub fn power_loss(&self, seed: u64) -> SimFs {
        let mut rng = StdRng::seed_from_u64(seed);
        let state = self.state.lock().unwrap();
        let mut after = State {
            dirs: state.dirs.clone(),
            ..State::default()
        };
        let mut paths: Vec<&PathBuf> = state.visible.keys().chain(state.durable.keys()).collect();
        paths.sort();
        paths.dedup();
        for path in paths {
            let visible = state.visible.get(path);
            let durable = state.durable.get(path);
            // An unsynced namespace change survives or not.
            let survivor = match (visible, durable) {
                (Some(v), Some(d)) if Arc::ptr_eq(v, d) => Some(v),
                (Some(v), Some(d)) => Some(if rng.random_bool(0.5) { v } else { d }),
                (Some(v), None) => rng.random_bool(0.5).then_some(v),
                (None, Some(d)) => rng.random_bool(0.5).then_some(d),
                (None, None) => None,
            };
            let Some(file) = survivor else { continue };
            let image = file.lock().unwrap();
            let mut bytes = image.durable.clone();
            let len = if rng.random_bool(0.5) {
                image.visible.len()
            } else {
                image.durable.len()
            };
            bytes.resize(len, 0);
            for sector in (0..len).step_by(SECTOR) {
                let end = (sector + SECTOR).min(len);
                if image.visible.get(sector..end) != image.durable.get(sector..end) && rng.random_bool(0.5) {
                    for (at, byte) in bytes[sector..end].iter_mut().enumerate() {
                        *byte = image.visible.get(sector + at).copied().unwrap_or(0);
                    }
                }
            }
            let file = Arc::new(Mutex::new(FileImage {
                visible: bytes.clone(),
                durable: bytes,
                unreadable: image.unreadable.clone(),
            }));
            after.visible.insert(path.clone(), file.clone());
            after.durable.insert(path.clone(), file);
        }
        SimFs {
            state: Arc::new(Mutex::new(after)),
        }
    }

    /// Flips one bit of a file's durable (and visible) image.
    pub fn flip_bit(&self, path: &Path, offset: usize, bit: u8) {
        let state = self.state.lock().unwrap();
        let file = state.visible.get(path).expect("file exists");
        let mut image = file.lock().unwrap();
        image.visible[offset] ^= 1 << bit;
        image.durable[offset] ^= 1 << bit;
    }

    /// Makes `[from, to)` of a file unreadable: reads touching it fail with EIO.
    pub fn make_unreadable(&self, path: &Path, from: usize, to: usize) {
        let state = self.state.lock().unwrap();
        let file = state.visible.get(path).expect("file exists");
        file.lock().unwrap().unreadable.push((from, to));
    }

    /// Every region of a file reads again (a transient error that went away).
    pub fn clear_unreadable(&self, path: &Path) {
        let state = self.state.lock().unwrap();
        if let Some(file) = state.visible.get(path) {
            file.lock().unwrap().unreadable.clear();
        }
    }

    pub fn file_len(&self, path: &Path) -> Option<usize> {
        let state = self.state.lock().unwrap();
        state.visible.get(path).map(|f| f.lock().unwrap().visible.len())
    }

    pub fn read(&self, path: &Path) -> Option<Vec<u8>> {
        let state = self.state.lock().unwrap();
        state.visible.get(path).map(|f| f.lock().unwrap().visible.clone())
    }

    /// Paths of every file, sorted.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.state.lock().unwrap().visible.keys().cloned().collect()
    }
}

struct SimFile {
    fs: SimFs,
    image: SharedFile,
}

impl WalFile for SimFile {
    fn read_exact_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<()> {
        let image = self.image.lock().unwrap();
        let offset = offset as usize;
        let end = offset + buffer.len();
        if image.unreadable.iter().any(|&(from, to)| from < end && offset < to) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let Some(bytes) = image.visible.get(offset..end) else {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        };
        buffer.copy_from_slice(bytes);
        Ok(())
    }

    fn write_all_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        let fault = self.fs.check(FaultOp::Write);
        let written = match fault {
            Some(FaultKind::TornWrite(keep)) => &bytes[..keep.min(bytes.len())],
            Some(_) => &[][..],
            None => bytes,
        };
        let mut image = self.image.lock().unwrap();
        let offset = offset as usize;
        if image.visible.len() < offset + written.len() {
            image.visible.resize(offset + written.len(), 0);
        }
        image.visible[offset..offset + written.len()].copy_from_slice(written);
        let end = offset + written.len();
        // Writeback rewrites whole pages: the drive remaps a bad sector it is given again.
        image.unreadable.retain(|&(from, to)| !(from < end && offset < to));
        match fault {
            Some(kind) => Err(error(kind)),
            None => Ok(()),
        }
    }

    fn sync_data(&self) -> io::Result<()> {
        if let Some(kind) = self.fs.check(FaultOp::Sync) {
            // A failed fsync may still have written some pages: nothing is promised.
            return Err(error(kind));
        }
        let mut image = self.image.lock().unwrap();
        image.durable = image.visible.clone();
        Ok(())
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        if let Some(kind) = self.fs.check(FaultOp::Allocate) {
            return Err(error(kind));
        }
        let mut image = self.image.lock().unwrap();
        if image.visible.len() < len as usize {
            image.visible.resize(len as usize, 0);
        }
        Ok(())
    }

    fn byte_len(&self) -> io::Result<u64> {
        Ok(self.image.lock().unwrap().visible.len() as u64)
    }
}

impl FileSystem for SimFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.state.lock().unwrap();
        if !state.dirs.iter().any(|d| d == dir) {
            state.dirs.push(dir.to_path_buf());
        }
        Ok(())
    }

    fn create_new(&self, path: &Path) -> io::Result<Arc<dyn WalFile>> {
        if let Some(kind) = self.check(FaultOp::Create) {
            return Err(error(kind));
        }
        let mut state = self.state.lock().unwrap();
        if state.visible.contains_key(path) {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        let image = SharedFile::default();
        state.visible.insert(path.to_path_buf(), image.clone());
        Ok(Arc::new(SimFile {
            fs: self.clone(),
            image,
        }))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn WalFile>> {
        let state = self.state.lock().unwrap();
        let image = state
            .visible
            .get(path)
            .cloned()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(Arc::new(SimFile {
            fs: self.clone(),
            image,
        }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state.lock().unwrap();
        state
            .visible
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.state.lock().unwrap();
        let image = state
            .visible
            .remove(from)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        state.visible.insert(to.to_path_buf(), image);
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let state = self.state.lock().unwrap();
        Ok(state
            .visible
            .keys()
            .filter(|path| path.parent() == Some(dir))
            .filter_map(|path| path.file_name()?.to_str().map(str::to_string))
            .collect())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        if let Some(kind) = self.check(FaultOp::Sync) {
            return Err(error(kind));
        }
        let mut state = self.state.lock().unwrap();
        let State { visible, durable, .. } = &mut *state;
        durable.retain(|path, _| path.parent() != Some(dir));
        for (path, image) in visible.iter() {
            if path.parent() == Some(dir) {
                durable.insert(path.clone(), image.clone());
            }
        }
        Ok(())
    }
}
