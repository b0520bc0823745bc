//! Segment files: preallocated, fixed-size files holding framed records back to back.
//!
//! A segment starts with an 8-byte magic; the unwritten rest is zeros, which the reader takes as
//! the end of the segment. A record never straddles two segments.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use fs4::fs_std::FileExt as AllocateExt;

pub const SEGMENT_MAGIC: &[u8; 8] = b"FLMWAL01";
pub const SEGMENT_HEADER_BYTES: u64 = SEGMENT_MAGIC.len() as u64;

pub fn segment_path(lane_dir: &Path, segment_no: u64) -> PathBuf {
    lane_dir.join(format!("{segment_no:020}.wal"))
}

/// Segment numbers present in `lane_dir`, ascending.
pub fn list_segments(lane_dir: &Path) -> io::Result<Vec<u64>> {
    let mut numbers = Vec::new();
    for entry in fs::read_dir(lane_dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(number) = name.strip_suffix(".wal").and_then(|n| n.parse::<u64>().ok()) {
            numbers.push(number);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

/// Creates segment `segment_no`, preallocated to `segment_bytes`, and makes both the file and its
/// directory entry durable before returning.
pub fn create_segment(lane_dir: &Path, segment_no: u64, segment_bytes: u64) -> io::Result<File> {
    let path = segment_path(lane_dir, segment_no);
    let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
    file.allocate(segment_bytes)?;
    file.write_all_at(SEGMENT_MAGIC, 0)?;
    file.sync_all()?;
    sync_dir(lane_dir)?;
    Ok(file)
}

pub fn open_segment(lane_dir: &Path, segment_no: u64) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(segment_path(lane_dir, segment_no))
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads the whole segment into memory.
pub fn read_all(file: &File) -> io::Result<Vec<u8>> {
    let len = file.metadata()?.len() as usize;
    let mut bytes = vec![0u8; len];
    file.read_exact_at(&mut bytes, 0)?;
    Ok(bytes)
}

pub fn has_magic(bytes: &[u8]) -> bool {
    bytes.starts_with(SEGMENT_MAGIC)
}
