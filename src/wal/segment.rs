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

/// The seal of a segment closed early: a write or fsync into it failed, so the lane moved on to
/// a new segment (`lane.rs`, healing). The seal names where the segment's durable batches end;
/// whatever the disk kept past that point was never acknowledged, and recovery ignores it
/// (otherwise a half-kept batch there, followed by valid batches in later segments, would read
/// as corruption, and a fully kept one would bring back writes that were answered as failed).
pub fn seal_path(lane_dir: &Path, segment_no: u64) -> PathBuf {
    lane_dir.join(format!("{segment_no:020}.sealed"))
}

const SEAL_MAGIC: &[u8; 8] = b"FLMSEAL1";
const SEAL_BYTES: usize = 8 + 8 + 8;

fn seal_checksum(segment_no: u64, end: u64) -> u64 {
    let mut bytes = [0u8; 24];
    bytes[..8].copy_from_slice(SEAL_MAGIC);
    bytes[8..16].copy_from_slice(&segment_no.to_be_bytes());
    bytes[16..].copy_from_slice(&end.to_be_bytes());
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

/// Seals segment `segment_no` at byte `end` (the end of its last durable batch): the seal file
/// and its directory entry are durable when this returns.
pub fn write_seal(fs: &dyn FileSystem, lane_dir: &Path, segment_no: u64, end: u64) -> io::Result<()> {
    let path = seal_path(lane_dir, segment_no);
    let file = match fs.create_new(&path) {
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
            fs.remove_file(&path)?;
            fs.create_new(&path)?
        }
        other => other?,
    };
    let mut bytes = Vec::with_capacity(SEAL_BYTES);
    bytes.extend_from_slice(SEAL_MAGIC);
    bytes.extend_from_slice(&end.to_be_bytes());
    bytes.extend_from_slice(&seal_checksum(segment_no, end).to_be_bytes());
    file.write_all_at(&bytes, 0)
        .and_then(|()| file.sync_data())
        .and_then(|()| fs.sync_dir(lane_dir))
}

/// Where segment `segment_no`'s durable batches end, if it was sealed. A seal that does not
/// check out is an error: it was made durable before anything after it was written, so a
/// damaged one means the lane cannot tell what the segment holds.
pub fn read_seal(fs: &dyn FileSystem, lane_dir: &Path, segment_no: u64) -> io::Result<Option<u64>> {
    let path = seal_path(lane_dir, segment_no);
    let file = match fs.open(&path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let bytes = super::fs::read_all(file.as_ref())?;
    let invalid = || io::Error::new(io::ErrorKind::InvalidData, format!("{} is damaged", path.display()));
    if bytes.len() != SEAL_BYTES || !bytes.starts_with(SEAL_MAGIC) {
        return Err(invalid());
    }
    let end = u64::from_be_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let checksum = u64::from_be_bytes(bytes[16..24].try_into().expect("8 bytes"));
    if checksum != seal_checksum(segment_no, end) {
        return Err(invalid());
    }
    Ok(Some(end))
}

/// Deletes a segment and its seal, if it has one.
pub fn remove_segment(fs: &dyn FileSystem, lane_dir: &Path, segment_no: u64) -> io::Result<()> {
    fs.remove_file(&segment_path(lane_dir, segment_no))?;
    match fs.remove_file(&seal_path(lane_dir, segment_no)) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
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
    // A seal left by a segment of this number deleted long ago must not apply to the new one.
    match fs.remove_file(&seal_path(lane_dir, segment_no)) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
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

/// Bytes of the sector granularity unreadable regions are found at.
pub const SECTOR_BYTES: usize = 512;
/// Bytes read at once when the disk reads fine.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Attempts per sector before it is taken as unreadable.
const SECTOR_READ_ATTEMPTS: usize = 2;

/// A segment's bytes as far as the disk can read them.
pub struct SegmentBytes {
    /// The whole file; unreadable sectors read as zeros here.
    pub bytes: Vec<u8>,
    /// `[from, to)` byte ranges the disk could not read (EIO), ascending and merged.
    pub unreadable: Vec<(usize, usize)>,
}

/// Whether a read error means "this part of the medium cannot be read" (one bad sector must
/// not stop the node), as opposed to an error about the file or the process.
fn is_unreadable(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EIO) | Some(libc::ENXIO) | Some(libc::EBADMSG) | Some(libc::EILSEQ)
    )
}

/// Reads a whole segment. A chunk that fails with a media error is read again sector by
/// sector (each retried once), so one bad sector costs that sector, not the segment; the
/// sectors that still fail are returned as `unreadable`. Other errors are returned.
pub fn read_segment(file: &dyn WalFile) -> io::Result<SegmentBytes> {
    let len = usize::try_from(file.byte_len()?).map_err(io::Error::other)?;
    let mut bytes = vec![0u8; len];
    let mut unreadable: Vec<(usize, usize)> = Vec::new();
    for chunk_start in (0..len).step_by(READ_CHUNK_BYTES) {
        let chunk_end = (chunk_start + READ_CHUNK_BYTES).min(len);
        match file.read_exact_at(&mut bytes[chunk_start..chunk_end], chunk_start as u64) {
            Ok(()) => continue,
            Err(error) if is_unreadable(&error) => {}
            Err(error) => return Err(error),
        }
        for sector_start in (chunk_start..chunk_end).step_by(SECTOR_BYTES) {
            let sector_end = (sector_start + SECTOR_BYTES).min(chunk_end);
            let sector = &mut bytes[sector_start..sector_end];
            let mut read = Err(io::Error::from_raw_os_error(libc::EIO));
            for _ in 0..SECTOR_READ_ATTEMPTS {
                read = file.read_exact_at(sector, sector_start as u64);
                if read.is_ok() {
                    break;
                }
            }
            match read {
                Ok(()) => {}
                Err(error) if is_unreadable(&error) => {
                    sector.fill(0);
                    match unreadable.last_mut() {
                        Some(last) if last.1 == sector_start => last.1 = sector_end,
                        _ => unreadable.push((sector_start, sector_end)),
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }
    Ok(SegmentBytes { bytes, unreadable })
}
