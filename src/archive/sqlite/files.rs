//! Session files in SQLite (see `Archive::insert_file`).

use rusqlite::{MAIN_DB, OptionalExtension, params};

use super::super::{FileInfo, Result, StoredFile};
use super::SqliteArchive;
use crate::model::Timestamp;

impl SqliteArchive {
    pub async fn insert_file(&self, file: std::sync::Arc<StoredFile>) -> Result<()> {
        self.with(move |c| {
            let info = &file.info;
            c.execute(
                "INSERT INTO files (session_id, id, media_type, filename, size, sha256, created_at, content)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    info.session_id,
                    info.id,
                    info.media_type,
                    info.filename,
                    info.size as i64,
                    info.sha256,
                    info.created_at.0,
                    &file.content[..],
                ],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn session_file_bytes(&self, session_id: &str) -> Result<u64> {
        let session_id = session_id.to_string();
        self.read(move |c| {
            c.prepare_cached("SELECT COALESCE(SUM(size), 0) FROM files WHERE session_id = ?1")?
                .query_row(params![session_id], |r| r.get::<_, i64>(0))
                .map(|total| total as u64)
        })
        .await
    }

    pub async fn file_info(&self, session_id: &str, id: &str) -> Result<Option<FileInfo>> {
        let (session_id, id) = (session_id.to_string(), id.to_string());
        self.read(move |c| {
            c.prepare_cached(
                "SELECT media_type, filename, size, sha256, created_at FROM files
                 WHERE session_id = ?1 AND id = ?2",
            )?
            .query_row(params![session_id, id], |r| {
                Ok(FileInfo {
                    session_id: session_id.clone(),
                    id: id.clone(),
                    media_type: r.get(0)?,
                    filename: r.get(1)?,
                    size: r.get::<_, i64>(2)? as u64,
                    sha256: r.get(3)?,
                    created_at: Timestamp(r.get(4)?),
                })
            })
            .optional()
        })
        .await
    }

    /// Through SQLite's incremental blob I/O: only the pages holding the range are read.
    pub async fn read_file(&self, session_id: &str, id: &str, start: u64, len: usize) -> Result<Option<bytes::Bytes>> {
        let (session_id, id) = (session_id.to_string(), id.to_string());
        self.read(move |c| {
            let rowid: Option<i64> = c
                .prepare_cached("SELECT rowid FROM files WHERE session_id = ?1 AND id = ?2")?
                .query_row(params![session_id, id], |r| r.get(0))
                .optional()?;
            let Some(rowid) = rowid else { return Ok(None) };
            let blob = c.blob_open(MAIN_DB, c"files", c"content", rowid, true)?;
            let start = (start as usize).min(blob.len());
            let mut buffer = vec![0u8; len.min(blob.len() - start)];
            blob.read_at_exact(&mut buffer, start)?;
            Ok(Some(buffer.into()))
        })
        .await
    }
}
