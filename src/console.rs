//! The web console (`console/`, a Preact app) served at `/`: its built files are embedded in
//! the binary, so a server needs no files at run time. The console talks to the server only
//! through the public REST API and the Phoenix socket.
//!
//! Architecture invariant: the console owns `/` and `/assets/*` only; it never shadows `/api`,
//! `/socket`, `/health` or `/metrics` (the SPA routes with `#/…`, so no other path is needed).

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// One embedded file of `console/dist`.
pub struct Asset {
    pub path: &'static str,
    pub content_type: &'static str,
    pub bytes: &'static [u8],
}

/// Every file of `console/dist` (a test checks the directory holds exactly these).
pub const ASSETS: &[Asset] = &[
    Asset {
        path: "index.html",
        content_type: "text/html; charset=utf-8",
        bytes: include_bytes!("../console/dist/index.html"),
    },
    Asset {
        path: "assets/app.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../console/dist/assets/app.js"),
    },
    Asset {
        path: "assets/app.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../console/dist/assets/app.css"),
    },
];

/// Same-origin only: no CDN, no inline script, sockets back to this server.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/", get(index)).route("/assets/{file}", get(asset))
}

async fn index(request_headers: HeaderMap) -> Response {
    serve("index.html", &request_headers).unwrap_or_else(|| StatusCode::NOT_FOUND.into_response())
}

async fn asset(Path(file): Path<String>, request_headers: HeaderMap) -> Response {
    serve(&format!("assets/{file}"), &request_headers)
        .unwrap_or_else(|| crate::api::ApiError::not_found("not_found", "no such route").into_response())
}

fn serve(path: &str, request_headers: &HeaderMap) -> Option<Response> {
    let asset = ASSETS.iter().find(|asset| asset.path == path)?;
    let etag = format!("\"{:016x}\"", xxhash_rust::xxh3::xxh3_64(asset.bytes));
    let matches = request_headers
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.split(',').any(|tag| tag.trim() == etag));
    let mut response = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        asset.bytes.into_response()
    };
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    // File names carry no hash: revalidate every time (cheap with the ETag).
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::ETAG, HeaderValue::from_str(&etag).expect("hex etag"));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_files_are_exactly_console_dist() {
        let dist = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("console/dist");
        let mut on_disk = Vec::new();
        let mut stack = vec![dist.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).expect("console/dist exists") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let relative = path.strip_prefix(&dist).expect("under dist");
                    on_disk.push(relative.to_string_lossy().replace('\\', "/"));
                }
            }
        }
        on_disk.sort();
        let mut embedded: Vec<String> = ASSETS.iter().map(|asset| asset.path.to_string()).collect();
        embedded.sort();
        assert_eq!(on_disk, embedded, "src/console.rs must embed every file vite writes");
    }

    #[test]
    fn the_first_load_is_small() {
        // Uncompressed bytes bound the compressed ones; the browser test checks gzip size too.
        let total: usize = ASSETS.iter().map(|asset| asset.bytes.len()).sum();
        assert!(total < 200 * 1024, "console first load is {total} bytes");
    }
}
