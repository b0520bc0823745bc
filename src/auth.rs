//! Who is calling: open mode (identities taken from the request, loopback only) or token mode
//! (HS256 JWTs whose `sub` is the identity, and an API key for admin calls).
//!
//! Architecture invariant: secrets never leave this module in logs, errors or responses.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

#[derive(Clone)]
pub enum AuthMode {
    Open,
    Token { secret: Vec<u8>, api_key: Option<String> },
}

/// The caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Open mode: anyone, acting as whoever the request names.
    Open,
    /// Token mode, with the API key: admin calls allowed.
    Admin,
    /// Token mode, with a valid token: acts as `sub` only.
    Subject(String),
}

impl Caller {
    /// May this caller act as `identity` (a user or agent id)?
    pub fn may_act_as(&self, identity: &str) -> bool {
        match self {
            Caller::Open | Caller::Admin => true,
            Caller::Subject(sub) => sub == identity,
        }
    }

    pub fn is_admin(&self) -> bool {
        matches!(self, Caller::Open | Caller::Admin)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing credentials")]
    Missing,
    #[error("invalid token")]
    Invalid,
    #[error("token expired")]
    Expired,
}

#[derive(Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: i64,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

impl AuthMode {
    /// Identifies the caller from an `Authorization: Bearer …` value.
    pub fn caller(&self, bearer: Option<&str>, now_secs: i64) -> Result<Caller, AuthError> {
        let AuthMode::Token { secret, api_key } = self else {
            return Ok(Caller::Open);
        };
        let token = bearer.ok_or(AuthError::Missing)?;
        if let Some(key) = api_key
            && constant_time_eq(token.as_bytes(), key.as_bytes())
        {
            return Ok(Caller::Admin);
        }
        verify(secret, token, now_secs).map(|claims| Caller::Subject(claims.sub))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks an HS256 JWT's signature and expiry and returns its claims.
pub fn verify(secret: &[u8], token: &str, now_secs: i64) -> Result<Claims, AuthError> {
    let mut parts = token.split('.');
    let (Some(header_part), Some(payload_part), Some(signature_part), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Invalid);
    };
    let header: Header = decode_part(header_part)?;
    if header.alg != "HS256" {
        return Err(AuthError::Invalid);
    }
    let signature = URL_SAFE_NO_PAD.decode(signature_part).map_err(|_| AuthError::Invalid)?;
    let signing_input = &token[..header_part.len() + 1 + payload_part.len()];
    let mut mac = HmacSha256::new_from_slice(secret).map_err(|_| AuthError::Invalid)?;
    mac.update(signing_input.as_bytes());
    mac.verify_slice(&signature).map_err(|_| AuthError::Invalid)?;
    let claims: Claims = decode_part(payload_part)?;
    if claims.sub.is_empty() {
        return Err(AuthError::Invalid);
    }
    if claims.exp <= now_secs {
        return Err(AuthError::Expired);
    }
    Ok(claims)
}

fn decode_part<T: for<'de> Deserialize<'de>>(part: &str) -> Result<T, AuthError> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| AuthError::Invalid)?;
    serde_json::from_slice(&bytes).map_err(|_| AuthError::Invalid)
}

/// Mints an HS256 JWT (for `fleetlm token` and tests).
pub fn mint(secret: &[u8], claims: &Claims) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialize"));
    let signing_input = format!("{header}.{payload}");
    let mut mac = HmacSha256::new_from_slice(secret).expect("hmac takes any key length");
    mac.update(signing_input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{signature}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123";

    #[test]
    fn a_minted_token_verifies() {
        let token = mint(
            SECRET,
            &Claims {
                sub: "alice".into(),
                exp: 2_000,
            },
        );
        assert_eq!(verify(SECRET, &token, 1_000).unwrap().sub, "alice");
    }

    #[test]
    fn expired_wrong_key_and_tampered_tokens_fail() {
        let token = mint(
            SECRET,
            &Claims {
                sub: "alice".into(),
                exp: 2_000,
            },
        );
        assert_eq!(verify(SECRET, &token, 2_000).err(), Some(AuthError::Expired));
        assert_eq!(
            verify(b"another secret!!!", &token, 1_000).err(),
            Some(AuthError::Invalid)
        );
        let forged_payload = URL_SAFE_NO_PAD.encode(br#"{"sub":"mallory","exp":9999}"#);
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[1] = &forged_payload;
        assert_eq!(verify(SECRET, &parts.join("."), 1_000).err(), Some(AuthError::Invalid));
        assert_eq!(verify(SECRET, "not-a-token", 1_000).err(), Some(AuthError::Invalid));
    }

    #[test]
    fn the_api_key_makes_an_admin() {
        let mode = AuthMode::Token {
            secret: SECRET.to_vec(),
            api_key: Some("k3y".into()),
        };
        assert_eq!(mode.caller(Some("k3y"), 0).unwrap(), Caller::Admin);
        assert_eq!(mode.caller(None, 0).err(), Some(AuthError::Missing));
        assert_eq!(AuthMode::Open.caller(None, 0).unwrap(), Caller::Open);
    }
}
