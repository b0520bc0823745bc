//! Signed webhooks (Standard Webhooks, <https://www.standardwebhooks.com>): every agent call
//! carries `webhook-id`, `webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256 of
//! "id.timestamp.body">` under the agent's signing secret(s), so an agent can tell a call from
//! its FleetLM from anyone else's and refuse replays with any Standard Webhooks library.
//!
//! Owns the secrets (`whsec_` + base64 of 32 random bytes, generated here and nowhere else),
//! their rotation (the previous secret stays valid for a grace period, during which calls carry
//! both signatures) and the signature itself. A secret is shown once, when it is made
//! (`SigningSecret::reveal`); its `Debug` form is redacted so no log or error can carry it.
//!
//! Architecture invariant: pure apart from the random bytes of a new secret; knows nothing of
//! HTTP, the archive or the API.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use rand::TryRngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::model::Timestamp;

/// What every secret starts with (as Standard Webhooks libraries expect).
pub const SECRET_PREFIX: &str = "whsec_";
/// Random bytes in a new secret (Standard Webhooks allows 24 to 64).
const SECRET_BYTES: usize = 32;
/// How long the previous secret stays valid after a rotation unless the rotation says otherwise.
pub const DEFAULT_GRACE_PERIOD_MS: u64 = 24 * 60 * 60 * 1000;
/// The longest grace period a rotation may ask for (7 days).
pub const MAX_GRACE_PERIOD_MS: u64 = 7 * 24 * 60 * 60 * 1000;

/// One signing secret, as its `whsec_…` text. Never printed by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SigningSecret(String);

impl SigningSecret {
    /// A new secret: 32 bytes from the operating system's generator.
    pub fn generate() -> SigningSecret {
        let mut key = [0u8; SECRET_BYTES];
        rand::rngs::OsRng
            .try_fill_bytes(&mut key)
            .expect("the operating system's random generator works");
        SigningSecret(format!("{SECRET_PREFIX}{}", STANDARD.encode(key)))
    }

    /// A stored secret: `whsec_` and the base64 of 24 to 64 bytes.
    pub fn parse(text: &str) -> Result<SigningSecret, String> {
        let decoded = text
            .strip_prefix(SECRET_PREFIX)
            .and_then(|encoded| STANDARD.decode(encoded).ok())
            .ok_or_else(|| "a signing secret is whsec_ and base64".to_string())?;
        if !(24..=64).contains(&decoded.len()) {
            return Err("a signing secret holds 24 to 64 bytes".into());
        }
        Ok(SigningSecret(text.to_string()))
    }

    /// The secret's text, for the one answer that shows it (creation, rotation) and for storage.
    pub fn reveal(&self) -> &str {
        &self.0
    }

    fn key(&self) -> Vec<u8> {
        let encoded = self.0.strip_prefix(SECRET_PREFIX).expect("checked when made");
        STANDARD.decode(encoded).expect("checked when made")
    }

    /// `v1,<base64 HMAC-SHA256 of "id.timestamp.body">` under this secret.
    fn sign(&self, webhook_id: &str, timestamp_s: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key()).expect("HMAC takes any key length");
        mac.update(webhook_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp_s.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningSecret(whsec_…)")
    }
}

impl TryFrom<String> for SigningSecret {
    type Error = String;
    fn try_from(text: String) -> Result<SigningSecret, String> {
        SigningSecret::parse(&text)
    }
}

impl From<SigningSecret> for String {
    fn from(secret: SigningSecret) -> String {
        secret.0
    }
}

/// An agent's signing secrets: the current one and, for a grace period after a rotation, the
/// one before it. Agents registered before signatures existed have none until their first
/// rotation (their calls are then unsigned).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningKeys {
    pub current: Option<SigningSecret>,
    /// When `current` was made.
    pub created_at: Option<Timestamp>,
    pub previous: Option<SigningSecret>,
    /// `previous` signs no call from this time on.
    pub previous_expires_at: Option<Timestamp>,
}

impl SigningKeys {
    /// The keys of a new agent: one fresh secret.
    pub fn fresh(now: Timestamp) -> SigningKeys {
        SigningKeys {
            current: Some(SigningSecret::generate()),
            created_at: Some(now),
            previous: None,
            previous_expires_at: None,
        }
    }

    /// A new current secret; the current one stays valid for `grace_period_ms` (a rotation
    /// during another's grace period ends that one: two secrets at most).
    pub fn rotated(&self, now: Timestamp, grace_period_ms: u64) -> SigningKeys {
        debug_assert!(grace_period_ms <= MAX_GRACE_PERIOD_MS);
        let grace_micros = i64::try_from(grace_period_ms).unwrap_or(i64::MAX).saturating_mul(1000);
        let previous = self.current.clone().filter(|_| grace_period_ms > 0);
        let previous_expires_at = previous.as_ref().map(|_| Timestamp(now.0.saturating_add(grace_micros)));
        SigningKeys {
            current: Some(SigningSecret::generate()),
            created_at: Some(now),
            previous,
            previous_expires_at,
        }
    }

    /// The secrets that sign a call made at `now`: the current one, and the previous one until
    /// its grace period ends.
    pub fn valid_at(&self, now: Timestamp) -> Vec<&SigningSecret> {
        let previous = self
            .previous
            .as_ref()
            .filter(|_| self.previous_expires_at.is_some_and(|expires| now < expires));
        self.current.iter().chain(previous).collect()
    }

    /// What the API shows of the keys: never a secret, only when the current one was made and
    /// when the previous one stops (stopped) signing, if a rotation kept it.
    pub fn public_json(&self) -> serde_json::Value {
        serde_json::json!({
            "secret_created_at": self.created_at,
            "previous_secret_expires_at": self.previous_expires_at,
        })
    }
}

/// The Standard Webhooks headers of one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureHeaders {
    pub webhook_id: String,
    pub webhook_timestamp: String,
    /// `None` when the agent has no secret yet.
    pub webhook_signature: Option<String>,
}

/// Signs a call's exact body bytes, sent at `now`, under every secret valid then (the
/// signatures space-separated, current first).
pub fn sign(keys: &SigningKeys, webhook_id: &str, now: Timestamp, body: &[u8]) -> SignatureHeaders {
    let timestamp_s = now.0.div_euclid(1_000_000);
    let signatures: Vec<String> = keys
        .valid_at(now)
        .iter()
        .map(|secret| secret.sign(webhook_id, timestamp_s, body))
        .collect();
    SignatureHeaders {
        webhook_id: webhook_id.to_string(),
        webhook_timestamp: timestamp_s.to_string(),
        webhook_signature: (!signatures.is_empty()).then(|| signatures.join(" ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector of the Standard Webhooks reference libraries.
    #[test]
    fn signs_like_the_reference_libraries() {
        let secret = SigningSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signature = secret.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn new_secrets_are_prefixed_random_and_parse_back() {
        let (one, two) = (SigningSecret::generate(), SigningSecret::generate());
        assert_ne!(one, two);
        assert!(one.reveal().starts_with(SECRET_PREFIX));
        assert_eq!(SigningSecret::parse(one.reveal()).unwrap(), one);
        assert_eq!(
            format!("{one:?}"),
            "SigningSecret(whsec_…)",
            "Debug never shows a secret"
        );
        assert!(!format!("{:?}", SigningKeys::fresh(Timestamp(1))).contains(one.reveal()));
        for bad in [
            "",
            "whsec_",
            "whsec_!!!",
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_AAAA",
        ] {
            assert!(SigningSecret::parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn a_rotation_signs_with_both_secrets_until_the_grace_period_ends() {
        let created = SigningKeys::fresh(Timestamp(1_000_000));
        let rotated = created.rotated(Timestamp(2_000_000), 1000);
        assert_ne!(rotated.current, created.current);
        assert_eq!(rotated.previous, created.current);
        assert_eq!(rotated.previous_expires_at, Some(Timestamp(3_000_000)));
        let during = sign(&rotated, "t", Timestamp(2_999_999), b"{}");
        let signatures: Vec<&str> = during.webhook_signature.as_deref().unwrap().split(' ').collect();
        assert_eq!(signatures.len(), 2);
        assert_eq!(signatures[0], rotated.current.as_ref().unwrap().sign("t", 2, b"{}"));
        assert_eq!(signatures[1], created.current.as_ref().unwrap().sign("t", 2, b"{}"));
        let after = sign(&rotated, "t", Timestamp(3_000_000), b"{}");
        assert_eq!(after.webhook_signature.unwrap().split(' ').count(), 1);
        assert_eq!(after.webhook_timestamp, "3");
        assert!(
            !rotated.public_json().to_string().contains(SECRET_PREFIX),
            "no secret shown"
        );

        let at_once = created.rotated(Timestamp(2_000_000), 0);
        assert_eq!((at_once.previous, at_once.previous_expires_at), (None, None));
        let twice = rotated.rotated(Timestamp(2_500_000), 1000);
        assert_eq!(twice.previous, rotated.current, "two secrets at most");
    }

    #[test]
    fn an_agent_without_a_secret_sends_no_signature() {
        let unsigned = sign(&SigningKeys::default(), "t", Timestamp(5_000_000), b"{}");
        assert_eq!(unsigned.webhook_signature, None);
        assert_eq!(
            (unsigned.webhook_id.as_str(), unsigned.webhook_timestamp.as_str()),
            ("t", "5")
        );
    }
}
