//! Segment files: preallocated, fixed-size files holding batches back to back.
//!
//! A segment starts with an 8-byte magic naming the format; the unwritten rest is zeros. A batch
//! never straddles two segments.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::fs::{FileSystem, WalFile};

pub const SEGMENT_MAGIC: &[u8; 8] = b"FLMWAL02";
/// The magic of format 1 (before batch framing); such segments are refused, never misread.
pub const SEGMENT_MAGIC_V1: &[u8; 8] = b"FLMWAL01";
pub const SEGMENT_HEADER_BYTES: u64 = SEGMENT_MAGIC.len() as u64;

pub fn segment_path(lane_dir: &Path, segment_no: u64) -> PathBuf {
    lane_dir.join(format!("{segment_no:020}.wal"))
}

/// Segment numbers present in `lane_dir`, ascending.
pub fn list_segments(fs: &dyn FileSystem, lane_dir: &Path) -> io::Result<Vec<u64>> {
    let mut numbers: Vec<u64> = fs
        .list(lane_dir)?
        .iter()
        .filter_map(|name| name.strip_suffix(".wal")?.parse().ok())
        .collect();
    numbers.sort_unstable();
    Ok(numbers)
}

/// Creates segment `segment_no`, preallocated to `segment_bytes`, and makes both the file and its
/// directory entry durable before returning. A file left by an earlier attempt that failed part
/// way (it never held a batch) is replaced; on failure nothing is left behind if it can be helped.
pub fn create_segment(
    fs: &dyn FileSystem,
    lane_dir: &Path,
    segment_no: u64,
    segment_bytes: u64,
) -> io::Result<Arc<dyn WalFile>> {
    let path = segment_path(lane_dir, segment_no);
    let file = match fs.create_new(&path) {
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
            fs.remove_file(&path)?;
            fs.create_new(&path)?
        }
        other => other?,
    };
    let prepared = file
        .allocate(segment_bytes)
        .and_then(|()| file.write_all_at(SEGMENT_MAGIC, 0))
        .and_then(|()| file.sync_data())
        .and_then(|()| fs.sync_dir(lane_dir));
    if let Err(error) = prepared {
        drop(file);
        let _ = fs.remove_file(&path);
        return Err(error);
    }
    Ok(file)
}

pub fn open_segment(fs: &dyn FileSystem, lane_dir: &Path, segment_no: u64) -> io::Result<Arc<dyn WalFile>> {
    fs.open(&segment_path(lane_dir, segment_no))
}
