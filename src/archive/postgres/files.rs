//! Session files in Postgres (see `Archive::insert_file`).

use super::super::{FileInfo, Result, StoredFile};
use super::{PostgresArchive, from_pg};
use crate::model::Timestamp;

impl PostgresArchive {
    pub async fn insert_file(&self, file: std::sync::Arc<StoredFile>) -> Result<()> {
        let info = &file.info;
        self.client()
            .await?
            .execute(
                "INSERT INTO files (session_id, id, media_type, filename, size, sha256, created_at, content)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &info.session_id,
                    &info.id,
                    &info.media_type,
                    &info.filename,
                    &(info.size as i64),
                    &info.sha256,
                    &info.created_at.0,
                    &&file.content[..],
                ],
            )
            .await
            .map_err(from_pg)?;
        Ok(())
    }

    pub async fn session_file_bytes(&self, session_id: &str) -> Result<u64> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT COALESCE(SUM(size), 0)::BIGINT FROM files WHERE session_id = $1",
                &[&session_id],
            )
            .await
            .map_err(from_pg)?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    pub async fn file_info(&self, session_id: &str, id: &str) -> Result<Option<FileInfo>> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT media_type, filename, size, sha256, created_at FROM files
                 WHERE session_id = $1 AND id = $2",
                &[&session_id, &id],
            )
            .await
            .map_err(from_pg)?;
        Ok(row.map(|r| FileInfo {
            session_id: session_id.to_string(),
            id: id.to_string(),
            media_type: r.get(0),
            filename: r.get(1),
            size: r.get::<_, i64>(2) as u64,
            sha256: r.get(3),
            created_at: Timestamp(r.get(4)),
        }))
    }

    /// A slice of the value: the column is stored uncompressed (`STORAGE EXTERNAL`, set with the
    /// schema), so Postgres reads only the TOAST chunks holding the range.
    pub async fn read_file(&self, session_id: &str, id: &str, start: u64, len: usize) -> Result<Option<bytes::Bytes>> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT substring(content FROM $3 FOR $4) FROM files WHERE session_id = $1 AND id = $2",
                // Files are at most 512 MiB (`max_file_bytes`): positions fit an `int`.
                &[&session_id, &id, &(start as i32 + 1), &(len as i32)],
            )
            .await
            .map_err(from_pg)?;
        Ok(row.map(|r| r.get::<_, Vec<u8>>(0).into()))
    }
}
