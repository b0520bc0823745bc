//! Who is calling: open mode (identities taken from the request, loopback only) or token mode
//! (HS256 JWTs whose `sub` is the identity, and an API key for admin calls).
//!
//! Tokens are checked with the `jsonwebtoken` crate, the algorithm pinned to HS256; `exp` is
//! required and `nbf` honoured, both with [`CLOCK_LEEWAY_SECS`] of leeway against the server's
//! clock; `aud` and `iss` are required and checked when configured.
//!
//! Architecture invariant: secrets never leave this module in logs, errors or responses.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Clock difference tolerated between token issuers and this server, for `exp` and `nbf`.
pub const CLOCK_LEEWAY_SECS: i64 = 30;

#[derive(Clone)]
pub enum AuthMode {
    Open,
    Token {
        rules: Box<TokenRules>,
        api_key: Option<String>,
    },
}

/// How tokens are verified: the secret and the optional audience and issuer they must name.
#[derive(Clone)]
pub struct TokenRules {
    key: DecodingKey,
    validation: Validation,
    /// For tokens the server mints itself (`POST /api/tokens`), with the same audience/issuer.
    encoding: EncodingKey,
    audience: Option<String>,
    issuer: Option<String>,
}

impl TokenRules {
    pub fn new(secret: &[u8], audience: Option<&str>, issuer: Option<&str>) -> TokenRules {
        let mut validation = Validation::new(Algorithm::HS256);
        // Time is checked below against the injected clock (`verify`'s `now_secs`).
        validation.validate_exp = false;
        validation.validate_nbf = false;
        let mut required = vec!["exp", "sub"];
        match audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        TokenRules {
            key: DecodingKey::from_secret(secret),
            validation,
            encoding: EncodingKey::from_secret(secret),
            audience: audience.map(str::to_owned),
            issuer: issuer.map(str::to_owned),
        }
    }

    /// A token for `sub` expiring at `exp` (Unix seconds) that these rules accept.
    pub fn mint(&self, sub: &str, exp: i64) -> String {
        #[derive(serde::Serialize)]
        struct Minted<'a> {
            sub: &'a str,
            exp: i64,
            #[serde(skip_serializing_if = "Option::is_none")]
            aud: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            iss: Option<&'a str>,
        }
        let claims = Minted {
            sub,
            exp,
            aud: self.audience.as_deref(),
            iss: self.issuer.as_deref(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding).expect("claims serialize")
    }
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
    #[error("token not valid yet")]
    NotYetValid,
}

#[derive(Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: i64,
}

/// The claims a token is checked on (`aud` and `iss` are checked by `jsonwebtoken`).
#[derive(Deserialize)]
struct CheckedClaims {
    sub: String,
    exp: i64,
    #[serde(default)]
    nbf: Option<i64>,
}

impl AuthMode {
    /// Identifies the caller from an `Authorization: Bearer …` value.
    pub fn caller(&self, bearer: Option<&str>, now_secs: i64) -> Result<Caller, AuthError> {
        let AuthMode::Token { rules, api_key } = self else {
            return Ok(Caller::Open);
        };
        let token = bearer.ok_or(AuthError::Missing)?;
        if let Some(key) = api_key
            && constant_time_eq(token.as_bytes(), key.as_bytes())
        {
            return Ok(Caller::Admin);
        }
        verify(rules, token, now_secs).map(|claims| Caller::Subject(claims.sub))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks an HS256 JWT's signature, `exp`, `nbf`, `aud` and `iss`, and returns its claims.
pub fn verify(rules: &TokenRules, token: &str, now_secs: i64) -> Result<Claims, AuthError> {
    let decoded =
        jsonwebtoken::decode::<CheckedClaims>(token, &rules.key, &rules.validation).map_err(|_| AuthError::Invalid)?;
    let claims = decoded.claims;
    if claims.sub.is_empty() {
        return Err(AuthError::Invalid);
    }
    if claims.exp.saturating_add(CLOCK_LEEWAY_SECS) <= now_secs {
        return Err(AuthError::Expired);
    }
    if claims
        .nbf
        .is_some_and(|nbf| nbf > now_secs.saturating_add(CLOCK_LEEWAY_SECS))
    {
        return Err(AuthError::NotYetValid);
    }
    Ok(Claims {
        sub: claims.sub,
        exp: claims.exp,
    })
}

/// Mints an HS256 JWT (for `fleetlm token` and tests).
pub fn mint(secret: &[u8], claims: &Claims) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("claims serialize")
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use serde_json::{Value, json};

    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123";

    fn rules() -> TokenRules {
        TokenRules::new(SECRET, None, None)
    }

    fn signed(claims: Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    #[test]
    fn a_minted_token_verifies() {
        let token = mint(
            SECRET,
            &Claims {
                sub: "alice".into(),
                exp: 2_000,
            },
        );
        assert_eq!(verify(&rules(), &token, 1_000).unwrap().sub, "alice");
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
        assert_eq!(
            verify(&rules(), &token, 2_000 + CLOCK_LEEWAY_SECS).err(),
            Some(AuthError::Expired)
        );
        let other = TokenRules::new(b"another secret!!!", None, None);
        assert_eq!(verify(&other, &token, 1_000).err(), Some(AuthError::Invalid));
        let forged_payload = URL_SAFE_NO_PAD.encode(br#"{"sub":"mallory","exp":9999}"#);
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[1] = &forged_payload;
        assert_eq!(
            verify(&rules(), &parts.join("."), 1_000).err(),
            Some(AuthError::Invalid)
        );
        assert_eq!(verify(&rules(), "not-a-token", 1_000).err(), Some(AuthError::Invalid));
    }

    #[test]
    fn exp_has_a_small_leeway_and_nbf_is_honoured() {
        let token = signed(json!({"sub": "alice", "exp": 2_000}));
        assert!(
            verify(&rules(), &token, 2_010).is_ok(),
            "10 s of clock skew is tolerated"
        );
        let early = signed(json!({"sub": "alice", "exp": 9_000, "nbf": 5_000}));
        assert_eq!(verify(&rules(), &early, 1_000).err(), Some(AuthError::NotYetValid));
        assert!(verify(&rules(), &early, 4_990).is_ok());
        assert!(verify(&rules(), &early, 6_000).is_ok());
        let no_exp = signed(json!({"sub": "alice"}));
        assert_eq!(verify(&rules(), &no_exp, 1_000).err(), Some(AuthError::Invalid));
    }

    #[test]
    fn the_algorithm_is_pinned() {
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(br#"{"sub":"mallory","exp":9999}"#)
        );
        assert_eq!(verify(&rules(), &none, 1_000).err(), Some(AuthError::Invalid));
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &json!({"sub": "alice", "exp": 9_999}),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(verify(&rules(), &hs512, 1_000).err(), Some(AuthError::Invalid));
    }

    #[test]
    fn a_configured_audience_and_issuer_are_required() {
        let strict = TokenRules::new(SECRET, Some("fleetlm"), Some("https://login.example"));
        let good = signed(json!({"sub": "a", "exp": 9_999, "aud": "fleetlm", "iss": "https://login.example"}));
        assert!(verify(&strict, &good, 1_000).is_ok());
        for bad in [
            json!({"sub": "a", "exp": 9_999, "iss": "https://login.example"}),
            json!({"sub": "a", "exp": 9_999, "aud": "other", "iss": "https://login.example"}),
            json!({"sub": "a", "exp": 9_999, "aud": "fleetlm"}),
            json!({"sub": "a", "exp": 9_999, "aud": "fleetlm", "iss": "https://evil.example"}),
        ] {
            assert_eq!(
                verify(&strict, &signed(bad.clone()), 1_000).err(),
                Some(AuthError::Invalid),
                "{bad}"
            );
        }
        assert!(
            verify(&rules(), &good, 1_000).is_ok(),
            "unconfigured: aud and iss are not checked"
        );
    }

    #[test]
    fn the_api_key_makes_an_admin() {
        let mode = AuthMode::Token {
            rules: Box::new(rules()),
            api_key: Some("k3y".into()),
        };
        assert_eq!(mode.caller(Some("k3y"), 0).unwrap(), Caller::Admin);
        assert_eq!(mode.caller(None, 0).err(), Some(AuthError::Missing));
        assert_eq!(AuthMode::Open.caller(None, 0).unwrap(), Caller::Open);
    }
}
