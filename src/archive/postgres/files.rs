//! Session files in Postgres (see `Archive::insert_file`).

use super::super::{Result, StoredFile};
use super::{PostgresArchive, from_pg};
use crate::model::Timestamp;

impl PostgresArchive {
    pub async fn insert_file(&self, file: std::sync::Arc<StoredFile>) -> Result<()> {
        self.client()
            .await?
            .execute(
                "INSERT INTO files (session_id, id, media_type, filename, size, sha256, created_at, content)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &file.session_id,
                    &file.id,
                    &file.media_type,
                    &file.filename,
                    &(file.size as i64),
                    &file.sha256,
                    &file.created_at.0,
                    &&file.content[..],
                ],
            )
            .await
            .map_err(from_pg)?;
        Ok(())
    }

    pub async fn get_file(&self, session_id: &str, id: &str) -> Result<Option<StoredFile>> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT media_type, filename, size, sha256, created_at, content FROM files
                 WHERE session_id = $1 AND id = $2",
                &[&session_id, &id],
            )
            .await
            .map_err(from_pg)?;
        Ok(row.map(|r| StoredFile {
            session_id: session_id.to_string(),
            id: id.to_string(),
            media_type: r.get(0),
            filename: r.get(1),
            size: r.get::<_, i64>(2) as u64,
            sha256: r.get(3),
            created_at: Timestamp(r.get(4)),
            content: r.get::<_, Vec<u8>>(5).into(),
        }))
    }
}
