//! Authenticated request/response connections between cluster nodes.
//!
//! One TCP connection per (caller, callee) pair carries any number of concurrent requests,
//! matched to responses by id. Each frame is a 4-byte big-endian length and a MessagePack body.
//! A connection starts with a mutual challenge–response over the cluster secret (HMAC-SHA256 of
//! both nonces and both node ids, with a different label per direction), so neither side accepts
//! a peer that does not know the secret, and a recorded handshake cannot be replayed. Both ends
//! then derive a session key, and every later frame carries a tag over its sequence number and
//! body (`FrameAuth`), so nothing on the path can forge, alter, replay or reorder frames. The
//! secret itself never crosses the wire and is never logged. (Frames are authenticated, not
//! encrypted: peer traffic belongs on a private network.)
//!
//! This module knows nothing of Raft: requests and responses are opaque bytes, answered by a
//! `PeerHandler`.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

const PROTOCOL_VERSION: u32 = 2;
/// Largest frame accepted (a Raft append of many batches stays far below).
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// After a failed connect, calls fail at once for this long instead of dialing again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);
/// Requests one incoming connection may have in progress at once.
const MAX_IN_PROGRESS: usize = 1024;
const OUTGOING_QUEUE: usize = 1024;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PeerError {
    #[error("node {0} is unreachable: {1}")]
    Unreachable(u64, String),
    #[error("node {0} refused the connection: {1}")]
    Refused(u64, String),
    #[error("the connection to node {0} was lost")]
    Disconnected(u64),
    #[error("node {0} did not answer within {1:?}")]
    TimedOut(u64, Duration),
    #[error("a request of {0} bytes exceeds the peer frame limit")]
    TooLarge(usize),
}

impl PeerError {
    /// The request surely never reached the peer (so it was not acted on): no connection, the
    /// peer refused it before reading requests, or it was too large to send.
    pub fn surely_not_delivered(&self) -> bool {
        matches!(
            self,
            PeerError::Unreachable(..) | PeerError::Refused(..) | PeerError::TooLarge(..)
        )
    }
}

/// Answers requests from peers.
pub trait PeerHandler: Send + Sync + 'static {
    fn handle(&self, from: u64, request: Vec<u8>) -> Pin<Box<dyn Future<Output = Vec<u8>> + Send>>;
}

#[derive(Serialize, Deserialize)]
enum Handshake {
    Hello {
        version: u32,
        from: u64,
        to: u64,
        #[serde(with = "serde_bytes")]
        nonce: Vec<u8>,
        /// The caller's cluster settings that every member must share (`Identity::shape`).
        shape: String,
    },
    Challenge {
        #[serde(with = "serde_bytes")]
        nonce: Vec<u8>,
        #[serde(with = "serde_bytes")]
        proof: Vec<u8>,
    },
    Proof {
        #[serde(with = "serde_bytes")]
        proof: Vec<u8>,
    },
    Accepted,
    Refused {
        reason: String,
    },
}

#[derive(Serialize, Deserialize)]
enum Frame {
    Request {
        id: u64,
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
    },
    Response {
        id: u64,
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
    },
}

fn proof(secret: &[u8], label: &[u8], from: u64, to: u64, client_nonce: &[u8], server_nonce: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(label);
    mac.update(&from.to_be_bytes());
    mac.update(&to.to_be_bytes());
    mac.update(client_nonce);
    mac.update(server_nonce);
    mac.finalize().into_bytes().to_vec()
}

fn verify(
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

const CLIENT_LABEL: &[u8] = b"fleetlm peer client v1";
const SERVER_LABEL: &[u8] = b"fleetlm peer server v1";
const SESSION_LABEL: &[u8] = b"fleetlm peer session v1";
/// Bytes of the tag that authenticates each frame after the handshake.
const TAG_BYTES: usize = 16;

/// Authenticates one direction of a connection's frames after the handshake: every frame
/// carries a tag over its sequence number and body under a key only the two ends derived (from
/// the secret and both nonces), so a frame cannot be forged, altered, replayed, reordered or
/// moved to another connection by anyone on the path.
struct FrameAuth {
    key: Vec<u8>,
    direction: &'static [u8],
    seq: u64,
}

impl FrameAuth {
    fn new(key: &[u8], direction: &'static [u8]) -> FrameAuth {
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
    fn seal(&mut self, mut frame: Vec<u8>) -> Vec<u8> {
        let tag = self.mac(&frame).finalize().into_bytes();
        frame.extend_from_slice(&tag[..TAG_BYTES]);
        self.seq += 1;
        frame
    }

    /// Checks and strips the tag of the next frame.
    fn open(&mut self, mut frame: Vec<u8>) -> io::Result<Vec<u8>> {
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

const CLIENT_TO_SERVER: &[u8] = b"c2s";
const SERVER_TO_CLIENT: &[u8] = b"s2c";

fn session_key(secret: &[u8], from: u64, to: u64, client_nonce: &[u8], server_nonce: &[u8]) -> Vec<u8> {
    proof(secret, SESSION_LABEL, from, to, client_nonce, server_nonce)
}

fn nonce() -> Vec<u8> {
    use rand::RngCore;
    let mut bytes = vec![0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

async fn write_frame<W: AsyncWriteExt + Unpin>(out: &mut W, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len())
        .ok()
        .filter(|len| *len as usize <= MAX_FRAME_BYTES)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "peer frame too large"))?;
    out.write_all(&len.to_be_bytes()).await?;
    out.write_all(body).await
}

async fn read_frame<R: AsyncReadExt + Unpin>(input: &mut R) -> io::Result<Vec<u8>> {
    read_frame_up_to(input, MAX_FRAME_BYTES).await
}

/// Handshake messages are small; nothing big is read before a peer has proven itself.
const MAX_HANDSHAKE_BYTES: usize = 4096;

async fn read_frame_up_to<R: AsyncReadExt + Unpin>(input: &mut R, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "peer frame too large"));
    }
    let mut body = vec![0u8; len];
    input.read_exact(&mut body).await?;
    Ok(body)
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    rmp_serde::to_vec(value).expect("peer messages always encode")
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> io::Result<T> {
    rmp_serde::from_slice(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

async fn send_handshake(stream: &mut TcpStream, message: &Handshake) -> io::Result<()> {
    write_frame(stream, &encode(message)).await
}

async fn receive_handshake(stream: &mut TcpStream) -> io::Result<Handshake> {
    decode(&read_frame_up_to(stream, MAX_HANDSHAKE_BYTES).await?)
}

/// Who this node is and what it shares with its peers.
#[derive(Clone)]
pub struct Identity {
    pub node_id: u64,
    pub secret: Arc<[u8]>,
    /// The settings every member must share, e.g. `shards=64 members=1,2,3`: members that
    /// disagree would map sessions to different shards or count different majorities, so their
    /// connections are refused with both settings named.
    pub shape: Arc<str>,
}

// ---------------------------------------------------------------------------------------------
// Calling a peer

/// Calls to one peer over a connection made on first use and made again after it breaks.
pub struct PeerClient {
    identity: Identity,
    to: u64,
    addr: String,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
    last_failure: Mutex<Option<(Instant, PeerError)>>,
    /// Since when connecting fails (logged once when it starts and once when it ends, instead
    /// of at every one of the many shard groups' RPCs).
    down_since: Mutex<Option<Instant>>,
}

struct Connection {
    to: u64,
    outgoing: mpsc::Sender<Vec<u8>>,
    /// Set when the connection must end (closed by us or lost): stops both its tasks.
    ended: watch::Sender<bool>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Vec<u8>>>>,
    next_id: AtomicU64,
    closed: AtomicBool,
}

impl Connection {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ended.send_replace(true);
        // Dropping the senders wakes every caller with `Disconnected`.
        self.pending.lock().expect("pending lock").clear();
    }
}

impl PeerClient {
    pub fn new(identity: Identity, to: u64, addr: String) -> PeerClient {
        PeerClient {
            identity,
            to,
            addr,
            connection: tokio::sync::Mutex::new(None),
            last_failure: Mutex::new(None),
            down_since: Mutex::new(None),
        }
    }

    /// The node this client calls.
    pub fn peer(&self) -> u64 {
        self.to
    }

    /// Closes the connection (calls in progress fail); a later call connects again.
    pub async fn close(&self) {
        if let Some(connection) = self.connection.lock().await.take() {
            connection.close();
        }
    }

    /// Sends `request` and waits for its response, at most `timeout` in all.
    pub async fn call(&self, request: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, PeerError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let connection = tokio::time::timeout_at(deadline, self.connection())
            .await
            .map_err(|_| PeerError::TimedOut(self.to, timeout))??;
        let id = connection.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer, response) = oneshot::channel();
        connection.pending.lock().expect("pending lock").insert(id, answer);
        if connection.closed.load(Ordering::Acquire) {
            connection.pending.lock().expect("pending lock").remove(&id);
            return Err(PeerError::Disconnected(self.to));
        }
        let frame = encode(&Frame::Request { id, body: request });
        if frame.len() + TAG_BYTES > MAX_FRAME_BYTES {
            // Refused alone: sending it would fail the connection and every call on it.
            connection.pending.lock().expect("pending lock").remove(&id);
            return Err(PeerError::TooLarge(frame.len()));
        }
        let sent = tokio::time::timeout_at(deadline, connection.outgoing.send(frame)).await;
        if !matches!(sent, Ok(Ok(()))) {
            connection.pending.lock().expect("pending lock").remove(&id);
            return Err(match sent {
                Err(_) => PeerError::TimedOut(self.to, timeout),
                _ => PeerError::Disconnected(self.to),
            });
        }
        match tokio::time::timeout_at(deadline, response).await {
            Ok(Ok(body)) => Ok(body),
            Ok(Err(_)) => Err(PeerError::Disconnected(self.to)),
            Err(_) => {
                connection.pending.lock().expect("pending lock").remove(&id);
                Err(PeerError::TimedOut(self.to, timeout))
            }
        }
    }

    async fn connection(&self) -> Result<Arc<Connection>, PeerError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref().filter(|c| !c.closed.load(Ordering::Acquire)) {
            return Ok(connection.clone());
        }
        if let Some((at, error)) = self.last_failure.lock().expect("failure lock").clone()
            && at.elapsed() < RECONNECT_PAUSE
        {
            return Err(error);
        }
        match self.connect().await {
            Ok(connection) => {
                *slot = Some(connection.clone());
                *self.last_failure.lock().expect("failure lock") = None;
                if let Some(since) = self.down_since.lock().expect("down lock").take() {
                    tracing::info!(
                        peer = self.to,
                        down_ms = since.elapsed().as_millis() as u64,
                        "peer reachable again"
                    );
                }
                Ok(connection)
            }
            Err(error) => {
                *self.last_failure.lock().expect("failure lock") = Some((Instant::now(), error.clone()));
                let mut down_since = self.down_since.lock().expect("down lock");
                if down_since.is_none() {
                    *down_since = Some(Instant::now());
                    tracing::warn!(peer = self.to, %error, "peer unreachable; retrying (logged again once it is back)");
                }
                Err(error)
            }
        }
    }

    async fn connect(&self) -> Result<Arc<Connection>, PeerError> {
        let unreachable = |e: String| PeerError::Unreachable(self.to, e);
        let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| unreachable("connect timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        stream.set_nodelay(true).map_err(|e| unreachable(e.to_string()))?;
        let key = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(&mut stream))
            .await
            .map_err(|_| unreachable("handshake timed out".into()))??;
        let (reader, writer) = stream.into_split();
        let (outgoing, queue) = mpsc::channel(OUTGOING_QUEUE);
        let connection = Arc::new(Connection {
            to: self.to,
            outgoing,
            ended: watch::channel(false).0,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
        });
        let (sealer, opener) = (
            FrameAuth::new(&key, CLIENT_TO_SERVER),
            FrameAuth::new(&key, SERVER_TO_CLIENT),
        );
        tokio::spawn(write_frames(writer, queue, sealer, connection.clone()));
        tokio::spawn(read_responses(reader, opener, connection.clone()));
        Ok(connection)
    }

    /// Returns the connection's session key.
    async fn handshake(&self, stream: &mut TcpStream) -> Result<Vec<u8>, PeerError> {
        let (from, to) = (self.identity.node_id, self.to);
        let lost = |e: io::Error| PeerError::Unreachable(to, format!("handshake: {e}"));
        let client_nonce = nonce();
        send_handshake(
            stream,
            &Handshake::Hello {
                version: PROTOCOL_VERSION,
                from,
                to,
                nonce: client_nonce.clone(),
                shape: self.identity.shape.to_string(),
            },
        )
        .await
        .map_err(lost)?;
        let server_nonce = match receive_handshake(stream).await.map_err(lost)? {
            Handshake::Challenge { nonce, proof } => {
                let secret = &self.identity.secret;
                if !verify(secret, SERVER_LABEL, from, to, &client_nonce, &nonce, &proof) {
                    return Err(PeerError::Refused(
                        to,
                        "it does not know the cluster secret (or is not the node configured at this address)".into(),
                    ));
                }
                nonce
            }
            Handshake::Refused { reason } => {
                tracing::error!(peer = to, %reason, "a peer refused this node");
                return Err(PeerError::Refused(to, reason));
            }
            _ => return Err(PeerError::Refused(to, "unexpected handshake message".into())),
        };
        let proof = proof(
            &self.identity.secret,
            CLIENT_LABEL,
            from,
            to,
            &client_nonce,
            &server_nonce,
        );
        send_handshake(stream, &Handshake::Proof { proof })
            .await
            .map_err(lost)?;
        match receive_handshake(stream).await.map_err(lost)? {
            Handshake::Accepted => Ok(session_key(
                &self.identity.secret,
                from,
                to,
                &client_nonce,
                &server_nonce,
            )),
            Handshake::Refused { reason } => Err(PeerError::Refused(to, reason)),
            _ => Err(PeerError::Refused(to, "unexpected handshake message".into())),
        }
    }
}

/// Writes queued frames, flushing once the queue is empty (many frames per syscall under load).
async fn write_frames(
    writer: OwnedWriteHalf,
    queue: mpsc::Receiver<Vec<u8>>,
    sealer: FrameAuth,
    connection: Arc<Connection>,
) {
    pump_frames(writer, queue, sealer, connection.ended.subscribe()).await;
    connection.close();
}

/// Writes queued frames until the queue closes, a write fails or `ended` turns true; flushes
/// once the queue is empty (and stayed so for one scheduler turn), so a burst of frames costs
/// one syscall.
async fn pump_frames(
    writer: OwnedWriteHalf,
    mut queue: mpsc::Receiver<Vec<u8>>,
    mut sealer: FrameAuth,
    mut ended: watch::Receiver<bool>,
) {
    let mut out = BufWriter::with_capacity(256 * 1024, writer);
    'run: loop {
        let frame = tokio::select! {
            frame = queue.recv() => frame,
            _ = ended.wait_for(|ended| *ended) => None,
        };
        let Some(frame) = frame else { break };
        if write_frame(&mut out, &sealer.seal(frame)).await.is_err() {
            break;
        }
        // Take what is queued, then once more after letting the tasks that are about to queue
        // frames run (other groups' RPCs, answers being encoded): one syscall for all of them.
        for last_round in [false, true] {
            while let Ok(frame) = queue.try_recv() {
                if write_frame(&mut out, &sealer.seal(frame)).await.is_err() {
                    break 'run;
                }
            }
            if !last_round {
                tokio::task::yield_now().await;
            }
        }
        if out.flush().await.is_err() {
            break;
        }
    }
}

async fn read_responses(mut reader: OwnedReadHalf, mut opener: FrameAuth, connection: Arc<Connection>) {
    let mut ended = connection.ended.subscribe();
    loop {
        let read = tokio::select! {
            read = read_frame(&mut reader) => read,
            _ = ended.wait_for(|ended| *ended) => break,
        };
        let frame = match read
            .and_then(|bytes| opener.open(bytes))
            .and_then(|bytes| decode::<Frame>(&bytes))
        {
            Ok(frame) => frame,
            Err(error) => {
                tracing::debug!(peer = connection.to, %error, "peer connection closed");
                break;
            }
        };
        if let Frame::Response { id, body } = frame
            && let Some(answer) = connection.pending.lock().expect("pending lock").remove(&id)
        {
            let _ = answer.send(body);
        }
    }
    connection.close();
}

// ---------------------------------------------------------------------------------------------
// Answering peers

/// Accepts peer connections on `listener` until the task is dropped. Only nodes in `members`
/// (other than this one) that prove they hold the secret get past the handshake.
/// Closing `stop` (sending `true` or dropping it) closes the listener and every connection.
pub async fn serve(
    listener: TcpListener,
    identity: Identity,
    members: Vec<u64>,
    handler: Arc<dyn PeerHandler>,
    stop: watch::Receiver<bool>,
) {
    let mut stopped = stop.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.wait_for(|stop| *stop) => return,
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "peer listener accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (identity, members, handler) = (identity.clone(), members.clone(), handler.clone());
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let mut stream = stream;
            let accepted =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, accept_handshake(&mut stream, &identity, &members)).await;
            match accepted {
                Ok(Ok((from, key))) => {
                    tokio::select! {
                        _ = serve_connection(stream, from, key, handler) => {}
                        _ = stop.wait_for(|stop| *stop) => {}
                    }
                }
                Ok(Err(reason)) => tracing::warn!(%remote, %reason, "peer connection refused"),
                Err(_) => tracing::warn!(%remote, "peer connection refused: handshake timed out"),
            }
        });
    }
}

/// Returns the caller's node id and the connection's session key.
async fn accept_handshake(
    stream: &mut TcpStream,
    identity: &Identity,
    members: &[u64],
) -> Result<(u64, Vec<u8>), String> {
    let io_reason = |e: io::Error| format!("handshake failed: {e}");
    let (version, from, to, client_nonce, shape) = match receive_handshake(stream).await.map_err(io_reason)? {
        Handshake::Hello {
            version,
            from,
            to,
            nonce,
            shape,
        } => (version, from, to, nonce, shape),
        _ => return Err("the first message was not a hello".into()),
    };
    if version != PROTOCOL_VERSION {
        return refuse(stream, format!("peer protocol {version} is not {PROTOCOL_VERSION}")).await;
    }
    if to != identity.node_id {
        return refuse(stream, format!("this is node {}, not node {to}", identity.node_id)).await;
    }
    if from == identity.node_id || !members.contains(&from) {
        return refuse(stream, format!("node {from} is not a member of this cluster")).await;
    }
    if shape != *identity.shape {
        return refuse(
            stream,
            format!(
                "cluster settings differ: node {from} has {shape}, node {to} has {}; every member needs the same shards and cluster_peers ids",
                identity.shape
            ),
        )
        .await;
    }
    let server_nonce = nonce();
    let proof_of_server = proof(&identity.secret, SERVER_LABEL, from, to, &client_nonce, &server_nonce);
    send_handshake(
        stream,
        &Handshake::Challenge {
            nonce: server_nonce.clone(),
            proof: proof_of_server,
        },
    )
    .await
    .map_err(io_reason)?;
    let given = match receive_handshake(stream).await.map_err(io_reason)? {
        Handshake::Proof { proof } => proof,
        _ => return Err("expected a proof".into()),
    };
    if !verify(
        &identity.secret,
        CLIENT_LABEL,
        from,
        to,
        &client_nonce,
        &server_nonce,
        &given,
    ) {
        return refuse(stream, format!("node {from} does not know the cluster secret")).await;
    }
    send_handshake(stream, &Handshake::Accepted).await.map_err(io_reason)?;
    let key = session_key(&identity.secret, from, to, &client_nonce, &server_nonce);
    Ok((from, key))
}

/// Tells the caller why it is refused, then gives the reason back for the log.
async fn refuse(stream: &mut TcpStream, reason: String) -> Result<(u64, Vec<u8>), String> {
    let _ = send_handshake(stream, &Handshake::Refused { reason: reason.clone() }).await;
    Err(reason)
}

async fn serve_connection(stream: TcpStream, from: u64, key: Vec<u8>, handler: Arc<dyn PeerHandler>) {
    let (mut reader, writer) = stream.into_split();
    let mut opener = FrameAuth::new(&key, CLIENT_TO_SERVER);
    let sealer = FrameAuth::new(&key, SERVER_TO_CLIENT);
    let (outgoing, queue) = mpsc::channel::<Vec<u8>>(OUTGOING_QUEUE);
    // Never set: this side ends when the peer hangs up or the listener stops (see `serve`).
    let (_never, not_ended) = watch::channel(false);
    let writer_task = tokio::spawn(pump_frames(writer, queue, sealer, not_ended));
    let in_progress = Arc::new(Semaphore::new(MAX_IN_PROGRESS));
    loop {
        let frame = match read_frame(&mut reader)
            .await
            .and_then(|bytes| opener.open(bytes))
            .and_then(|bytes| decode::<Frame>(&bytes))
        {
            Ok(frame) => frame,
            Err(error) => {
                if error.kind() == io::ErrorKind::InvalidData {
                    tracing::warn!(peer = from, %error, "peer connection closed");
                }
                break;
            }
        };
        let Frame::Request { id, body } = frame else { continue };
        let Ok(permit) = in_progress.clone().acquire_owned().await else {
            break;
        };
        let (handler, outgoing) = (handler.clone(), outgoing.clone());
        tokio::spawn(async move {
            let response = handler.handle(from, body).await;
            let _ = outgoing.send(encode(&Frame::Response { id, body: response })).await;
            drop(permit);
        });
    }
    drop(outgoing);
    let _ = writer_task.await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Echo;
    impl PeerHandler for Echo {
        fn handle(&self, from: u64, request: Vec<u8>) -> Pin<Box<dyn Future<Output = Vec<u8>> + Send>> {
            Box::pin(async move {
                let mut response = from.to_be_bytes().to_vec();
                response.extend(request);
                response
            })
        }
    }

    fn identity(node_id: u64, secret: &str) -> Identity {
        Identity {
            node_id,
            secret: Arc::from(secret.as_bytes()),
            shape: Arc::from("shards=1 members=1,2"),
        }
    }

    async fn server(node_id: u64, secret: &str, members: Vec<u64>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        std::mem::forget(stop);
        tokio::spawn(serve(
            listener,
            identity(node_id, secret),
            members,
            Arc::new(Echo),
            stopped,
        ));
        addr
    }

    #[tokio::test]
    async fn members_with_the_secret_talk_and_others_are_refused() {
        let addr = server(2, "s3cret-s3cret-s3cret", vec![1, 2, 3]).await;
        let good = PeerClient::new(identity(1, "s3cret-s3cret-s3cret"), 2, addr.to_string());
        let timeout = Duration::from_secs(5);
        // Many concurrent calls over one connection come back matched to their callers.
        let calls = (0u8..50).map(|i| good.call(vec![i], timeout));
        for (i, answer) in futures_util::future::join_all(calls).await.into_iter().enumerate() {
            let mut expected = 1u64.to_be_bytes().to_vec();
            expected.push(i as u8);
            assert_eq!(answer.expect("answered"), expected);
        }

        let wrong_secret = PeerClient::new(identity(1, "another-secret-entirely"), 2, addr.to_string());
        let error = wrong_secret.call(vec![1], timeout).await.expect_err("refused");
        assert!(matches!(error, PeerError::Refused(2, _)), "{error:?}");

        let stranger = PeerClient::new(identity(9, "s3cret-s3cret-s3cret"), 2, addr.to_string());
        let error = stranger.call(vec![1], timeout).await.expect_err("refused");
        assert!(
            matches!(&error, PeerError::Refused(2, reason) if reason.contains("not a member")),
            "{error:?}"
        );

        // A member started with other shards or another member list maps sessions to other
        // groups: refused, with both settings named.
        let other_shape = Identity {
            shape: Arc::from("shards=8 members=1,2"),
            ..identity(1, "s3cret-s3cret-s3cret")
        };
        let error = PeerClient::new(other_shape, 2, addr.to_string())
            .call(vec![1], timeout)
            .await
            .expect_err("refused");
        assert!(
            matches!(&error, PeerError::Refused(2, reason)
                if reason.contains("node 1 has shards=8 members=1,2, node 2 has shards=1 members=1,2")),
            "{error:?}"
        );

        let wrong_node = PeerClient::new(identity(1, "s3cret-s3cret-s3cret"), 3, addr.to_string());
        let error = wrong_node.call(vec![1], timeout).await.expect_err("refused");
        assert!(
            matches!(&error, PeerError::Refused(3, reason) if reason.contains("not node 3")),
            "{error:?}"
        );
    }

    /// Something on the path alters a byte of a request after the handshake: the callee closes
    /// the connection instead of acting on it, and the caller gets an error, not a wrong answer.
    #[tokio::test]
    async fn a_frame_altered_on_the_path_is_refused() {
        let server = server(2, "s3cret-s3cret-s3cret", vec![1, 2]).await;
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = proxy.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut inbound, _) = proxy.accept().await.unwrap();
            let mut outbound = TcpStream::connect(server).await.unwrap();
            let (mut in_read, mut in_write) = inbound.split();
            let (mut out_read, mut out_write) = outbound.split();
            let upstream = async {
                let mut seen = 0usize;
                let mut buffer = vec![0u8; 4096];
                loop {
                    let n = in_read.read(&mut buffer).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    // Past the handshake (well under 300 bytes): flip one bit of the request.
                    for (i, byte) in buffer[..n].iter_mut().enumerate() {
                        if seen + i == 300 {
                            *byte ^= 0x01;
                        }
                    }
                    seen += n;
                    if out_write.write_all(&buffer[..n]).await.is_err() {
                        break;
                    }
                }
            };
            let downstream = async {
                let _ = tokio::io::copy(&mut out_read, &mut in_write).await;
                let _ = in_write.shutdown().await;
            };
            let _ = tokio::join!(upstream, downstream);
        });
        let client = PeerClient::new(identity(1, "s3cret-s3cret-s3cret"), 2, proxy_addr.to_string());
        let answer = client.call(vec![7u8; 1000], Duration::from_secs(5)).await;
        assert!(
            matches!(answer, Err(PeerError::Disconnected(2))),
            "an altered request was answered: {answer:?}"
        );
    }

    #[tokio::test]
    async fn an_impostor_server_is_not_trusted() {
        // A listener that answers the handshake without the secret cannot pass as node 2.
        let addr = server(2, "the-impostor-guesses", vec![1, 2]).await;
        let client = PeerClient::new(identity(1, "the-real-cluster-key"), 2, addr.to_string());
        let error = client.call(vec![1], Duration::from_secs(5)).await.expect_err("refused");
        assert!(
            matches!(&error, PeerError::Refused(2, reason) if reason.contains("secret")),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_peer_fails_fast_and_reconnects_when_back() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let client = PeerClient::new(identity(1, "s3cret-s3cret-s3cret"), 2, addr.to_string());
        let error = client
            .call(vec![1], Duration::from_secs(5))
            .await
            .expect_err("nothing listens");
        assert!(matches!(error, PeerError::Unreachable(2, _)), "{error:?}");
        let listener = TcpListener::bind(addr).await.unwrap();
        let (stop, stopped) = watch::channel(false);
        std::mem::forget(stop);
        tokio::spawn(serve(
            listener,
            identity(2, "s3cret-s3cret-s3cret"),
            vec![1, 2],
            Arc::new(Echo),
            stopped,
        ));
        tokio::time::sleep(RECONNECT_PAUSE).await;
        assert!(client.call(vec![7], Duration::from_secs(5)).await.is_ok());
    }
}
