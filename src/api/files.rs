//! `/api/sessions/:id/files`: a session's uploaded files (attachments).
//!
//! `POST` stores the request body whole in the archive (so every node of a cluster serves it)
//! and answers its id and the path messages refer to it by; `GET` serves it to the session's
//! participants, or to anyone holding a signed URL a dispatch gave its agent (`file_urls`).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::sessions::authorize_session;
use super::{ApiError, ApiResult, SharedState};
use crate::archive::StoredFile;
use crate::auth::Caller;
use crate::model::{SessionStatus, Timestamp};

const MAX_FILENAME_CHARS: usize = 255;
/// How long an upload's body may take to arrive (25 MiB at about 2 Mbit/s).
const UPLOAD_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);
const MAX_MEDIA_TYPE_CHARS: usize = 255;

/// Media types a browser may show in place; anything else is served as a download, so an
/// uploaded page or script never runs on the server's origin.
const SHOWN_INLINE: &[&str] = &[
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "application/pdf",
    "text/plain",
    "audio/mpeg",
    "audio/wav",
    "video/mp4",
];

pub async fn upload(
    State(state): State<SharedState>,
    caller: Caller,
    Path(session_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    request: Request,
) -> ApiResult<Response> {
    let media_type = media_type(request.headers())?;
    let filename = filename(query.get("filename"))?;
    let limit = state.config.max_file_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "file_too_large",
            format!("the file exceeds the limit of {limit} bytes"),
        )
    };
    if declared_length(request.headers()).is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }
    // The session and the caller's right to it first: an outsider's bytes are not read.
    let session = state.shards.view(&session_id).await?;
    if !caller.is_admin() {
        authorize_session(&caller, &session)?;
    }
    if session.status == SessionStatus::Archived {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "session_archived",
            "the session is archived; it accepts no files",
        ));
    }
    // Each upload holds its whole body in memory until the archive took it: bounded per node.
    let Ok(_permit) = state.files.uploads.try_acquire() else {
        let mut error = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "too many file uploads at once; retry shortly",
        );
        error.retry_after_secs = Some(1);
        return Err(error);
    };
    // A body that trickles in must not hold an upload slot for ever.
    let content = match tokio::time::timeout(UPLOAD_DEADLINE, axum::body::to_bytes(request.into_body(), limit)).await {
        Ok(read) => read.map_err(|_| too_large())?,
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "upload_timeout",
                format!("the file did not arrive within {} seconds", UPLOAD_DEADLINE.as_secs()),
            ));
        }
    };
    if content.is_empty() {
        return Err(ApiError::unprocessable("invalid_file", "the file is empty"));
    }
    let file = Arc::new(StoredFile {
        session_id: session_id.clone(),
        id: crate::ids::generate_id(),
        media_type,
        filename,
        size: content.len() as u64,
        sha256: hex(&Sha256::digest(&content)),
        created_at: Timestamp(state.clock.now_micros()),
        content,
    });
    state.shards.archive().insert_file(file.clone()).await?;
    metrics::counter!("fleetlm_files_uploaded_total").increment(1);
    metrics::counter!("fleetlm_file_upload_bytes_total").increment(file.size);
    Ok((StatusCode::CREATED, axum::Json(json!({"file": describe(&file)}))).into_response())
}

pub async fn download(
    State(state): State<SharedState>,
    Path((session_id, file_id)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    request: Request,
) -> ApiResult<Response> {
    match (query.get("signature"), query.get("expires")) {
        (Some(signature), Some(expires)) => {
            let now_secs = state.clock.now_micros() / 1_000_000;
            let valid = expires.parse::<i64>().is_ok_and(|expires| {
                state
                    .files
                    .signer
                    .verify(&session_id, &file_id, expires, signature, now_secs)
            });
            if !valid {
                return Err(ApiError::forbidden(
                    "the file URL's signature is not valid or has expired",
                ));
            }
        }
        (None, None) => {
            let (mut parts, _) = request.into_parts();
            let caller = Caller::from_request_parts(&mut parts, &state).await?;
            if !caller.is_admin() {
                authorize_session(&caller, &state.shards.view(&session_id).await?)?;
            }
        }
        _ => {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                "a signed file URL has both expires and signature",
            ));
        }
    }
    let Ok(_permit) = state.files.downloads.try_acquire() else {
        let mut error = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "too many files being served at once; retry shortly",
        );
        error.retry_after_secs = Some(1);
        return Err(error);
    };
    let file = state
        .shards
        .archive()
        .get_file(&session_id, &file_id)
        .await?
        .ok_or_else(|| ApiError::not_found("file_not_found", "file not found"))?;
    metrics::counter!("fleetlm_files_served_total").increment(1);
    let mut response = Response::new(Body::from(file.content.clone()));
    let headers = response.headers_mut();
    let media_type = HeaderValue::from_str(&file.media_type)
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_TYPE, media_type);
    headers.insert(header::CONTENT_DISPOSITION, disposition(&file));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // Whatever the file holds, it runs nothing on this origin.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox; default-src 'none'"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=3600"));
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", file.sha256)) {
        headers.insert(header::ETAG, etag);
    }
    Ok(response)
}

/// What the upload answers (and nothing of the content).
fn describe(file: &StoredFile) -> serde_json::Value {
    json!({
        "id": file.id,
        "session_id": file.session_id,
        "media_type": file.media_type,
        "filename": file.filename,
        "size": file.size,
        "sha256": file.sha256,
        "inserted_at": file.created_at.to_rfc3339(),
        "url": crate::file_urls::file_path(&file.session_id, &file.id),
    })
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// The request's `content-type` (`application/octet-stream` when absent), as `type/subtype`
/// with any parameters, checked to be a plain header token.
fn media_type(headers: &HeaderMap) -> ApiResult<String> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok("application/octet-stream".to_string());
    };
    let text = value.to_str().ok().map(str::trim).unwrap_or_default();
    let essence = text.split(';').next().unwrap_or_default().trim();
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    match essence.split_once('/') {
        Some((kind, subtype)) if token(kind) && token(subtype) && text.len() <= MAX_MEDIA_TYPE_CHARS => {
            Ok(text.to_ascii_lowercase())
        }
        _ => Err(ApiError::unprocessable(
            "invalid_file",
            "content-type must be a media type (type/subtype)",
        )),
    }
}

fn filename(value: Option<&String>) -> ApiResult<Option<String>> {
    let Some(name) = value.filter(|name| !name.is_empty()) else {
        return Ok(None);
    };
    if name.chars().count() > MAX_FILENAME_CHARS
        || name
            .chars()
            .any(|c| c.is_control() || c == '/' || c == '\\' || c == '"')
    {
        return Err(ApiError::unprocessable(
            "invalid_file",
            "filename must be at most 255 characters, without control characters, slashes or quotes",
        ));
    }
    Ok(Some(name.clone()))
}

fn disposition(file: &StoredFile) -> HeaderValue {
    let essence = file.media_type.split(';').next().unwrap_or_default();
    let kind = if SHOWN_INLINE.contains(&essence) {
        "inline"
    } else {
        "attachment"
    };
    let value = match &file.filename {
        // RFC 6266: the name percent-encoded as UTF-8 (any character is then header-safe).
        Some(name) => format!("{kind}; filename*=UTF-8''{}", percent_encode(name)),
        None => kind.to_string(),
    };
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
