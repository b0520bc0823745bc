//! Signed file URLs: how an agent — or the model provider it hands a file part to — fetches a
//! session's uploaded file without the session's credentials.
//!
//! A message's file part points at its file by path (`/api/sessions/<session>/files/<file>`,
//! what the upload answered). When a dispatch sends the session's history to its agent, each
//! such part of that same session becomes an absolute URL on `public_url` with `expires` (unix
//! seconds) and `signature` (URL-safe base64 of HMAC-SHA256 over the session, the file and the
//! expiry). `GET` on the file accepts that signature instead of a token until it expires. The
//! key is derived from the cluster secret, so every member verifies what any member signed; a
//! single node draws one at start (URLs it signed end with the process, as they would expire).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// How long a signed URL in a dispatch stays valid: longer than any dispatch is allowed to run
/// by default, so an agent that fetches a file late in a long turn still can.
pub const SIGNED_URL_LIFETIME_SECS: i64 = 60 * 60;

pub struct FileUrlSigner {
    key: [u8; 32],
}

impl FileUrlSigner {
    /// A key of this process only (a single node).
    pub fn random() -> FileUrlSigner {
        FileUrlSigner { key: rand::random() }
    }

    /// The key every member of a cluster derives from its shared secret.
    pub fn from_cluster_secret(secret: &str) -> FileUrlSigner {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
        mac.update(b"fleetlm file urls v1");
        FileUrlSigner {
            key: mac.finalize().into_bytes().into(),
        }
    }

    fn mac(&self, session_id: &str, file_id: &str, expires: i64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
        // Length-prefixed, so no two (session, file) pairs sign the same bytes.
        for part in [session_id.as_bytes(), file_id.as_bytes()] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac.update(&expires.to_be_bytes());
        mac
    }

    pub fn signature(&self, session_id: &str, file_id: &str, expires: i64) -> String {
        URL_SAFE_NO_PAD.encode(self.mac(session_id, file_id, expires).finalize().into_bytes())
    }

    /// Whether `signature` was made here for this file and `expires` has not passed.
    pub fn verify(&self, session_id: &str, file_id: &str, expires: i64, signature: &str, now_secs: i64) -> bool {
        let Ok(given) = URL_SAFE_NO_PAD.decode(signature) else {
            return false;
        };
        now_secs <= expires && self.mac(session_id, file_id, expires).verify_slice(&given).is_ok()
    }
}

/// What signing and checking file URLs needs: the key and the base URL agents reach this server
/// at (configured, or learnt once the HTTP listener is bound).
pub struct FileAccess {
    pub signer: FileUrlSigner,
    public_url: std::sync::OnceLock<String>,
    /// Uploads being received (`MAX_CONCURRENT_UPLOADS`).
    pub uploads: tokio::sync::Semaphore,
    /// Files being served (`MAX_CONCURRENT_DOWNLOADS`).
    pub downloads: std::sync::Arc<tokio::sync::Semaphore>,
}

/// Files a node serves at once: each holds at most one slice (`FILE_SLICE_BYTES`) in memory
/// while it is sent.
pub const MAX_CONCURRENT_DOWNLOADS: usize = 32;

/// Uploads a node receives at once: each holds its whole body in memory until the archive took
/// it, so this bounds that memory (16 × the 25 MiB default). Beyond it: 503 `overloaded`.
pub const MAX_CONCURRENT_UPLOADS: usize = 16;

impl FileAccess {
    pub fn new(signer: FileUrlSigner, public_url: Option<String>) -> FileAccess {
        let access = FileAccess {
            signer,
            public_url: std::sync::OnceLock::new(),
            uploads: tokio::sync::Semaphore::new(MAX_CONCURRENT_UPLOADS),
            downloads: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_DOWNLOADS)),
        };
        if let Some(url) = public_url {
            let _ = access.public_url.set(url);
        }
        access
    }

    /// Without a configured `public_url`: `http://` and the address the server listens on (a
    /// wildcard address as loopback, which reaches agents on the same host only).
    pub fn learn_bound_address(&self, address: std::net::SocketAddr) {
        let mut address = address;
        if address.ip().is_unspecified() && self.public_url.get().is_none() {
            tracing::warn!(
                %address,
                "public_url is not set: file URLs given to agents point at loopback; set public_url if agents run elsewhere"
            );
            address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let _ = self.public_url.set(format!("http://{address}"));
    }

    pub fn public_url(&self) -> &str {
        self.public_url.get().map_or("", String::as_str)
    }
}

/// The path a file is served at (and that messages' file parts name it by).
pub fn file_path(session_id: &str, file_id: &str) -> String {
    format!("/api/sessions/{session_id}/files/{file_id}")
}

/// The file id a message part's URL names, if it is a file of `session_id` on this server: a
/// path as the upload answered it, or an absolute URL with that path.
fn file_of_session<'a>(url: &'a str, session_id: &str) -> Option<&'a str> {
    let path = match url.find("://") {
        Some(scheme_end) => {
            let rest = &url[scheme_end + 3..];
            &rest[rest.find('/')?..]
        }
        None => url,
    };
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let file_id = path
        .strip_prefix("/api/sessions/")?
        .strip_prefix(session_id)?
        .strip_prefix("/files/")?;
    (!file_id.is_empty() && !file_id.contains('/')).then_some(file_id)
}

/// Rewrites the file parts of `messages` (a dispatch's history, each message's
/// `content.parts[]`) that name a file of `session_id` into signed absolute URLs on
/// `public_url`. Parts naming another session's files are left as they are (never signed: a
/// participant cannot reach another session's file through its agent). Returns how many were
/// signed.
pub fn sign_file_parts(
    messages: &mut [Value],
    session_id: &str,
    public_url: &str,
    signer: &FileUrlSigner,
    expires: i64,
) -> usize {
    let mut signed = 0;
    for message in messages {
        let Some(parts) = message
            .get_mut("content")
            .and_then(|content| content.get_mut("parts"))
            .and_then(Value::as_array_mut)
        else {
            continue;
        };
        for part in parts {
            if part.get("type").and_then(Value::as_str) != Some("file") {
                continue;
            }
            let Some(file_id) = part
                .get("url")
                .and_then(Value::as_str)
                .and_then(|url| file_of_session(url, session_id))
                .map(str::to_owned)
            else {
                continue;
            };
            let url = format!(
                "{public_url}{}?expires={expires}&signature={}",
                file_path(session_id, &file_id),
                signer.signature(session_id, &file_id, expires)
            );
            part["url"] = Value::String(url);
            signed += 1;
        }
    }
    signed
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_signature_holds_for_its_file_until_it_expires_and_for_nothing_else() {
        let signer = FileUrlSigner::from_cluster_secret("a-cluster-secret-of-16+");
        let signature = signer.signature("s1", "f1", 1_000);
        assert!(signer.verify("s1", "f1", 1_000, &signature, 999));
        assert!(signer.verify("s1", "f1", 1_000, &signature, 1_000));
        assert!(!signer.verify("s1", "f1", 1_000, &signature, 1_001), "expired");
        assert!(!signer.verify("s1", "f2", 1_000, &signature, 0), "another file");
        assert!(!signer.verify("s2", "f1", 1_000, &signature, 0), "another session");
        assert!(!signer.verify("s1", "f1", 2_000, &signature, 0), "a moved expiry");
        assert!(!signer.verify("s1", "f1", 1_000, "not base64!", 0));
        // Members of one cluster agree; another secret or a random key does not.
        let member = FileUrlSigner::from_cluster_secret("a-cluster-secret-of-16+");
        assert!(member.verify("s1", "f1", 1_000, &signature, 0));
        assert!(!FileUrlSigner::from_cluster_secret("another-secret-0123").verify("s1", "f1", 1_000, &signature, 0));
        assert!(!FileUrlSigner::random().verify("s1", "f1", 1_000, &signature, 0));
        // The length prefix keeps ("s1f", "1") apart from ("s1", "f1").
        assert!(!signer.verify("s1f", "1", 1_000, &signature, 0));
    }

    #[test]
    fn only_this_sessions_file_parts_are_signed() {
        let signer = FileUrlSigner::random();
        let mut messages = vec![
            json!({"content": {"text": "look", "parts": [
                {"type": "text", "text": "look"},
                {"type": "file", "mediaType": "image/png", "url": "/api/sessions/s1/files/f1"},
                {"type": "file", "mediaType": "image/png", "url": "/api/sessions/s2/files/f9"},
                {"type": "file", "mediaType": "image/png", "url": "https://elsewhere.example/x.png"},
                {"type": "file", "mediaType": "image/png", "url": "data:image/png;base64,AAAA"},
            ]}}),
            json!({"content": "plain"}),
        ];
        let signed = sign_file_parts(&mut messages, "s1", "https://chat.example", &signer, 5_000);
        assert_eq!(signed, 1);
        let parts = &messages[0]["content"]["parts"];
        let url = parts[1]["url"].as_str().unwrap();
        let signature = signer.signature("s1", "f1", 5_000);
        assert_eq!(
            url,
            format!("https://chat.example/api/sessions/s1/files/f1?expires=5000&signature={signature}")
        );
        assert_eq!(parts[2]["url"], "/api/sessions/s2/files/f9");
        assert_eq!(parts[3]["url"], "https://elsewhere.example/x.png");
        assert_eq!(parts[4]["url"], "data:image/png;base64,AAAA");
        // An already absolute URL of this session's file (signed earlier) is signed afresh.
        let mut again = messages.clone();
        assert_eq!(
            sign_file_parts(&mut again, "s1", "https://chat.example", &signer, 9_000),
            1
        );
        assert!(
            again[0]["content"]["parts"][1]["url"]
                .as_str()
                .unwrap()
                .contains("expires=9000")
        );
    }
}
