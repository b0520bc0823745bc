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
    /// The HMAC state after the key and the direction: cloned for every frame, so a frame pays
    /// for its own bytes only, not for hashing the key pads again.
    keyed: Hmac<Sha256>,
    seq: u64,
}

impl FrameAuth {
    pub(super) fn new(key: &[u8], direction: &'static [u8]) -> FrameAuth {
        let mut keyed = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        keyed.update(direction);
        FrameAuth { keyed, seq: 0 }
    }

    fn mac(&self, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.keyed.clone();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The tag is HMAC-SHA256 over direction, sequence number and body under the session key,
    /// however it is computed: a member that derives it differently cannot talk to the others.
    #[test]
    fn a_frame_tag_is_the_hmac_of_direction_sequence_and_body() {
        let key = b"a session key of some length";
        let mut sealer = FrameAuth::new(key, CLIENT_TO_SERVER);
        for (seq, body) in [(0u64, &b"first"[..]), (1, &b""[..]), (2, &[7u8; 300][..])] {
            let mut expected = Hmac::<Sha256>::new_from_slice(key).unwrap();
            expected.update(CLIENT_TO_SERVER);
            expected.update(&seq.to_be_bytes());
            expected.update(body);
            let expected = expected.finalize().into_bytes();
            let sealed = sealer.seal(body.to_vec());
            assert_eq!(&sealed[..body.len()], body);
            assert_eq!(&sealed[body.len()..], &expected[..TAG_BYTES], "frame {seq}");
        }
        let mut opener = FrameAuth::new(key, CLIENT_TO_SERVER);
        let mut wrong_direction = FrameAuth::new(key, SERVER_TO_CLIENT);
        let frame = FrameAuth::new(key, CLIENT_TO_SERVER).seal(b"hello".to_vec());
        assert!(wrong_direction.open(frame.clone()).is_err());
        assert_eq!(opener.open(frame.clone()).unwrap(), b"hello");
        assert!(
            opener.open(frame).is_err(),
            "a replayed frame has the wrong sequence number"
        );
    }
}
