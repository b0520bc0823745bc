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
use futures_util::StreamExt;

use super::byte_range;
use crate::archive::{Archive, FileInfo, StoredFile};
use crate::auth::Caller;
use crate::model::{SessionStatus, Timestamp};

const MAX_FILENAME_CHARS: usize = 255;
/// How long an upload's body may take to arrive (25 MiB at about 2 Mbit/s).
const UPLOAD_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);
const MAX_MEDIA_TYPE_CHARS: usize = 255;
/// A download reads the file from the archive in slices of this size.
const FILE_SLICE_BYTES: u64 = 1024 * 1024;

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

/// An upload refused before its body was read leaves that body on the connection: the answer
/// closes it (`connection: close`), or a client reusing the connection for its next request
/// would have it fail (the server closes it anyway, having not read the body).
pub async fn upload(
    state: State<SharedState>,
    caller: Caller,
    session_id: Path<String>,
    query: Query<HashMap<String, String>>,
    request: Request,
) -> Response {
    match receive_upload(state, caller, session_id, query, request).await {
        Ok(response) => response,
        Err(error) => {
            let mut response = error.into_response();
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
    }
}

async fn receive_upload(
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
    // What the session's files already hold: a declared length past the quota reads no byte.
    let quota = state.config.max_session_file_bytes;
    let used = state.shards.archive().session_file_bytes(&session_id).await?;
    let over_quota = |used: u64| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "session_file_quota",
            format!("the session's files would exceed their quota of {quota} bytes ({used} bytes used)"),
        )
    };
    if used + declared_length(request.headers()).unwrap_or(1) > quota {
        return Err(over_quota(used));
    }
    // Each upload holds its whole body in memory until the archive took it: bounded per node.
    let Ok(_permit) = state.files.uploads.try_acquire() else {
        return Err(ApiError::overloaded("too many file uploads at once; retry shortly"));
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
    // Again with the real size and what other uploads stored meanwhile (two uploads stored at
    // the same moment may both pass: the quota is exceeded by at most the other's size).
    let used = state.shards.archive().session_file_bytes(&session_id).await?;
    if used + content.len() as u64 > quota {
        return Err(over_quota(used));
    }
    let file = Arc::new(StoredFile {
        info: FileInfo {
            session_id: session_id.clone(),
            id: crate::ids::generate_id(),
            media_type,
            filename,
            size: content.len() as u64,
            sha256: hex(&Sha256::digest(&content)),
            created_at: Timestamp(state.clock.now_micros()),
        },
        content,
    });
    state.shards.archive().insert_file(file.clone()).await?;
    metrics::counter!("fleetlm_files_uploaded_total").increment(1);
    metrics::counter!("fleetlm_file_upload_bytes_total").increment(file.info.size);
    Ok((StatusCode::CREATED, axum::Json(json!({"file": describe(&file.info)}))).into_response())
}

pub async fn download(
    State(state): State<SharedState>,
    Path((session_id, file_id)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    request: Request,
) -> ApiResult<Response> {
    let conditions = request.headers().clone();
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
    let Ok(permit) = state.files.downloads.clone().try_acquire_owned() else {
        return Err(ApiError::overloaded(
            "too many files being served at once; retry shortly",
        ));
    };
    let archive = state.shards.archive().clone();
    let info = archive.file_info(&session_id, &file_id).await?.ok_or_else(not_found)?;
    let etag = format!("\"{}\"", info.sha256);
    let (status, start, end) = match byte_range::answer(&conditions, info.size, &etag) {
        byte_range::Answer::NotModified => {
            let mut response = StatusCode::NOT_MODIFIED.into_response();
            cache_headers(response.headers_mut(), &etag);
            return Ok(response);
        }
        byte_range::Answer::Unsatisfiable => {
            let mut response = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("the range is outside the file's {} bytes", info.size),
            )
            .into_response();
            if let Ok(value) = HeaderValue::from_str(&format!("bytes */{}", info.size)) {
                response.headers_mut().insert(header::CONTENT_RANGE, value);
            }
            return Ok(response);
        }
        byte_range::Answer::Whole => (StatusCode::OK, 0, info.size),
        byte_range::Answer::Part { start, end } => (StatusCode::PARTIAL_CONTENT, start, end),
    };
    // The first slice before the answer: a file the archive cannot read gets an error status,
    // not a cut body. The rest follows slice by slice, one in memory at a time, under the
    // download's permit.
    let first = read_slice(&archive, &session_id, &file_id, start, end).await?;
    let after_first = start + first.len() as u64;
    let rest = futures_util::stream::try_unfold(
        (archive, permit, session_id, file_id, after_first),
        move |(archive, permit, session_id, file_id, next)| async move {
            if next >= end {
                return Ok(None);
            }
            let slice = read_slice(&archive, &session_id, &file_id, next, end)
                .await
                .map_err(|error| {
                    metrics::counter!("fleetlm_file_download_failures_total").increment(1);
                    // Ends the body short of its length: the client sees the download failed.
                    std::io::Error::other(format!("the file could not be read: {}", error.code))
                })?;
            let next = next + slice.len() as u64;
            Ok(Some((slice, (archive, permit, session_id, file_id, next))))
        },
    );
    metrics::counter!("fleetlm_files_served_total").increment(1);
    let body = futures_util::stream::once(async move { Ok::<_, std::io::Error>(first) }).chain(rest);
    let mut response = Response::new(Body::from_stream(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    let media_type = HeaderValue::from_str(&info.media_type)
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_TYPE, media_type);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    headers.insert(header::CONTENT_DISPOSITION, disposition(&info));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // Whatever the file holds, it runs nothing on this origin.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox; default-src 'none'"),
    );
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(value) = HeaderValue::from_str(&format!("bytes {start}-{}/{}", end - 1, info.size))
    {
        headers.insert(header::CONTENT_RANGE, value);
    }
    cache_headers(headers, &etag);
    Ok(response)
}

fn not_found() -> ApiError {
    ApiError::not_found("file_not_found", "file not found")
}

/// A file's content never changes under its id: a client may keep it for an hour, and ask again
/// with its tag.
fn cache_headers(headers: &mut HeaderMap, etag: &str) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=3600"));
    if let Ok(etag) = HeaderValue::from_str(etag) {
        headers.insert(header::ETAG, etag);
    }
}

/// The next slice of `file` from `start`, at most `FILE_SLICE_BYTES` and never past `end`.
async fn read_slice(
    archive: &Archive,
    session_id: &str,
    file_id: &str,
    start: u64,
    end: u64,
) -> ApiResult<bytes::Bytes> {
    let len = (end - start).min(FILE_SLICE_BYTES) as usize;
    let slice = archive
        .read_file(session_id, file_id, start, len)
        .await?
        .ok_or_else(not_found)?;
    if slice.is_empty() {
        // Shorter than its recorded size: never answer a body that ends early without saying so.
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the stored file is shorter than its recorded size",
        ));
    }
    Ok(slice)
}

/// What the upload answers (and nothing of the content).
fn describe(file: &FileInfo) -> serde_json::Value {
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

fn disposition(file: &FileInfo) -> HeaderValue {
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
