//! Who may talk and what they say: the handshake's proofs over the cluster secret, the session
//! key both ends derive from it, and the tag that authenticates every later frame.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io;

pub(super) fn proof(
    secret: &[u8],
    label: &[u8],
    from: u64,
    to: u64,
    client_nonce: &[u8],
    server_nonce: &[u8],
) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(label);
    mac.update(&from.to_be_bytes());
    mac.update(&to.to_be_bytes());
    mac.update(client_nonce);
    mac.update(server_nonce);
    mac.finalize().into_bytes().to_vec()
}

pub(super) fn verify(
    secret: &[u8],
    label: &[u8],
    from: u64,
    to: u64,
    client_nonce: &[u8],
    server_nonce: &[u8],
    given: &[u8],
) -> bool {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(label);
    mac.update(&from.to_be_bytes());
    mac.update(&to.to_be_bytes());
    mac.update(client_nonce);
    mac.update(server_nonce);
    mac.verify_slice(given).is_ok()
}

pub(super) const CLIENT_LABEL: &[u8] = b"fleetlm peer client v1";
pub(super) const SERVER_LABEL: &[u8] = b"fleetlm peer server v1";
const SESSION_LABEL: &[u8] = b"fleetlm peer session v1";
/// Bytes of the tag that authenticates each frame after the handshake.
pub(super) const TAG_BYTES: usize = 16;

/// Authenticates one direction of a connection's frames after the handshake: every frame
/// carries a tag over its sequence number and body under a key only the two ends derived (from
/// the secret and both nonces), so a frame cannot be forged, altered, replayed, reordered or
/// moved to another connection by anyone on the path.
pub(super) struct FrameAuth {
    key: Vec<u8>,
    direction: &'static [u8],
    seq: u64,
}

impl FrameAuth {
    pub(super) fn new(key: &[u8], direction: &'static [u8]) -> FrameAuth {
        FrameAuth {
            key: key.to_vec(),
            direction,
            seq: 0,
        }
    }

    fn mac(&self, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(self.direction);
        mac.update(&self.seq.to_be_bytes());
        mac.update(body);
        mac
    }

    /// Appends the tag of the next frame.
    pub(super) fn seal(&mut self, mut frame: Vec<u8>) -> Vec<u8> {
        let tag = self.mac(&frame).finalize().into_bytes();
        frame.extend_from_slice(&tag[..TAG_BYTES]);
        self.seq += 1;
        frame
    }

    /// Checks and strips the tag of the next frame.
    pub(super) fn open(&mut self, mut frame: Vec<u8>) -> io::Result<Vec<u8>> {
        let refused = || io::Error::new(io::ErrorKind::InvalidData, "a peer frame failed authentication");
        let body_len = frame.len().checked_sub(TAG_BYTES).ok_or_else(refused)?;
        self.mac(&frame[..body_len])
            .verify_truncated_left(&frame[body_len..])
            .map_err(|_| refused())?;
        frame.truncate(body_len);
        self.seq += 1;
        Ok(frame)
    }
}

pub(super) const CLIENT_TO_SERVER: &[u8] = b"c2s";
pub(super) const SERVER_TO_CLIENT: &[u8] = b"s2c";

pub(super) fn session_key(secret: &[u8], from: u64, to: u64, client_nonce: &[u8], server_nonce: &[u8]) -> Vec<u8> {
    proof(secret, SESSION_LABEL, from, to, client_nonce, server_nonce)
}

pub(super) fn nonce() -> Vec<u8> {
    use rand::RngCore;
    let mut bytes = vec![0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}
