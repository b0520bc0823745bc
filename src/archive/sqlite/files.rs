//! Session files in SQLite (see `Archive::insert_file`).

use rusqlite::{OptionalExtension, params};

use super::super::{Result, StoredFile};
use super::SqliteArchive;
use crate::model::Timestamp;

impl SqliteArchive {
    pub async fn insert_file(&self, file: std::sync::Arc<StoredFile>) -> Result<()> {
        self.with(move |c| {
            c.execute(
                "INSERT INTO files (session_id, id, media_type, filename, size, sha256, created_at, content)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    file.session_id,
                    file.id,
                    file.media_type,
                    file.filename,
                    file.size as i64,
                    file.sha256,
                    file.created_at.0,
                    &file.content[..],
                ],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn get_file(&self, session_id: &str, id: &str) -> Result<Option<StoredFile>> {
        let (session_id, id) = (session_id.to_string(), id.to_string());
        self.read(move |c| {
            c.prepare_cached(
                "SELECT media_type, filename, size, sha256, created_at, content FROM files
                 WHERE session_id = ?1 AND id = ?2",
            )?
            .query_row(params![session_id, id], |r| {
                Ok(StoredFile {
                    session_id: session_id.clone(),
                    id: id.clone(),
                    media_type: r.get(0)?,
                    filename: r.get(1)?,
                    size: r.get::<_, i64>(2)? as u64,
                    sha256: r.get(3)?,
                    created_at: Timestamp(r.get(4)?),
                    content: r.get::<_, Vec<u8>>(5)?.into(),
                })
            })
            .optional()
        })
        .await
    }
}
