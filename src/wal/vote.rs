//! Per-shard vote files (`vote/NNNNN.vote`): the Raft hard state that must survive a crash
//! independently of the log. Written to a temporary file, fsync'd, renamed, directory fsync'd.

use std::io;
use std::path::{Path, PathBuf};

use super::fs::{self, FileSystem};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vote {
    pub term: u64,
    pub voted_for: u64,
    /// Whether a quorum granted this vote (the node it names is the term's leader).
    pub committed: bool,
}

/// term, voted_for, flags (bit 0: committed), CRC of the preceding bytes.
const VOTE_BYTES: usize = 8 + 8 + 8 + 4;
const FLAG_COMMITTED: u64 = 1;

fn vote_dir(wal_dir: &Path) -> PathBuf {
    wal_dir.join("vote")
}

pub fn ensure_dir(fs: &dyn FileSystem, wal_dir: &Path) -> io::Result<()> {
    fs.create_dir_all(&vote_dir(wal_dir))
}

pub fn save(fs: &dyn FileSystem, wal_dir: &Path, shard: u16, vote: Vote) -> io::Result<()> {
    let dir = vote_dir(wal_dir);
    let mut bytes = Vec::with_capacity(VOTE_BYTES);
    bytes.extend_from_slice(&vote.term.to_le_bytes());
    bytes.extend_from_slice(&vote.voted_for.to_le_bytes());
    let flags = if vote.committed { FLAG_COMMITTED } else { 0 };
    bytes.extend_from_slice(&flags.to_le_bytes());
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    let temporary = dir.join(format!("{shard:05}.vote.tmp"));
    match fs.remove_file(&temporary) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let file = fs.create_new(&temporary)?;
    file.write_all_at(&bytes, 0)?;
    file.sync_data()?;
    drop(file);
    fs.rename(&temporary, &dir.join(format!("{shard:05}.vote")))?;
    fs.sync_dir(&dir)
}

pub fn read(fs: &dyn FileSystem, wal_dir: &Path, shard: u16) -> io::Result<Option<Vote>> {
    let bytes = match fs.open(&vote_dir(wal_dir).join(format!("{shard:05}.vote"))) {
        Ok(file) => fs::read_all(file.as_ref())?,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    if bytes.len() != VOTE_BYTES || crc32c::crc32c(&bytes[..24]).to_le_bytes() != bytes[24..28] {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vote file of shard {shard} is corrupt"),
        ));
    }
    let term = u64::from_le_bytes(bytes[0..8].try_into().expect("8 bytes"));
    let voted_for = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let flags = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    Ok(Some(Vote {
        term,
        voted_for,
        committed: flags & FLAG_COMMITTED != 0,
    }))
}
