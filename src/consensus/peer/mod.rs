//! Authenticated request/response connections between cluster nodes.
//!
//! A caller keeps one TCP connection per lane (`Lane`) to each callee; each carries any number
//! of concurrent requests, matched to responses by id. The lanes are separate connections so
//! that nothing queued on one (a big application answer, a log append heavy with entries) ever
//! delays a frame on another (a heartbeat, a vote): not in this module's queues, not in the
//! callee's reader, not in TCP. Each frame is a 4-byte big-endian length and a MessagePack body.
//!
//! Every answer is bounded (`MAX_ANSWER_BYTES`, well under the frame limit): the callee refuses
//! to send a bigger one and fails that one call with `PeerError::AnswerTooLarge` instead, so an
//! oversized answer never breaks the connection and the other calls on it.
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

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

mod auth;

use auth::{
    CLIENT_LABEL, CLIENT_TO_SERVER, FrameAuth, SERVER_LABEL, SERVER_TO_CLIENT, TAG_BYTES, nonce, proof, session_key,
    verify,
};

/// 3: answers may be refused as too large (`Frame::Refused`); callers open one connection per lane.
/// 4: log entries in format 2 (binary, `shard::ops`), which a member of version 3 cannot read.
/// (A version-4 member that does not know a newer request, such as `CanLead`, answers it as
/// undecodable; callers of such optional requests take that as "no", so it stays version 4.)
const PROTOCOL_VERSION: u32 = 4;
/// Largest frame accepted (a Raft append of many batches stays far below).
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;
/// Largest answer a callee sends (its whole frame). A bigger one fails its call alone
/// (`PeerError::AnswerTooLarge`); whatever can grow (history pages, listings) is paged by its
/// owner well below this.
pub const MAX_ANSWER_BYTES: usize = 8 * 1024 * 1024;
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
    /// The callee ran the request but its answer was over `MAX_ANSWER_BYTES`: not sent.
    #[error("node {0} could not send its answer of {1} bytes: the peer answer limit is {MAX_ANSWER_BYTES} bytes")]
    AnswerTooLarge(u64, usize),
}

/// The connection a request travels on (see the module comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Small requests whose delay costs availability: heartbeats, votes, membership questions.
    Control,
    /// Requests carrying data for a consensus log: appends with entries, snapshots.
    Replication,
    /// Requests of the application above consensus: forwarded calls, relayed events.
    Application,
}

impl Lane {
    fn index(self) -> usize {
        self as usize
    }
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
    /// The request ran, but its answer of `bytes` was over `MAX_ANSWER_BYTES`.
    AnswerTooLarge { id: u64, bytes: u64 },
}

/// The frame that answers request `id` with `body`, or says the answer was too large to send.
fn answer_frame(from: u64, id: u64, body: Vec<u8>) -> Vec<u8> {
    let frame = encode(&Frame::Response { id, body });
    if frame.len() + TAG_BYTES <= MAX_ANSWER_BYTES {
        return frame;
    }
    tracing::warn!(
        peer = from,
        bytes = frame.len(),
        limit = MAX_ANSWER_BYTES,
        "an answer to a peer is over the answer limit; that call fails"
    );
    metrics::counter!("fleetlm_peer_answers_too_large_total").increment(1);
    encode(&Frame::AnswerTooLarge {
        id,
        bytes: frame.len() as u64,
    })
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

/// Calls to one peer, over one connection per lane, each made on first use and made again after
/// it breaks.
pub struct PeerClient {
    identity: Identity,
    to: u64,
    addr: String,
    lanes: [LaneLink; 3],
    /// Since when connecting fails (logged once when it starts and once when it ends, instead
    /// of at every one of the many shard groups' RPCs).
    down_since: Mutex<Option<Instant>>,
}

/// One lane's connection to the peer.
#[derive(Default)]
struct LaneLink {
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
    last_failure: Mutex<Option<(Instant, PeerError)>>,
}

/// What a caller waiting for an answer gets.
type Answer = Result<Vec<u8>, PeerError>;

struct Connection {
    to: u64,
    outgoing: mpsc::Sender<Vec<u8>>,
    /// Set when the connection must end (closed by us or lost): stops both its tasks.
    ended: watch::Sender<bool>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
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
            lanes: Default::default(),
            down_since: Mutex::new(None),
        }
    }

    /// The node this client calls.
    pub fn peer(&self) -> u64 {
        self.to
    }

    /// Whether the last attempt to connect to the peer succeeded (true before any attempt).
    pub fn reachable(&self) -> bool {
        self.down_since.lock().expect("down lock").is_none()
    }

    /// Closes every lane's connection (calls in progress fail); a later call connects again.
    pub async fn close(&self) {
        for lane in &self.lanes {
            if let Some(connection) = lane.connection.lock().await.take() {
                connection.close();
            }
        }
    }

    /// Sends `request` on `lane` and waits for its response, at most `timeout` in all.
    pub async fn call(&self, lane: Lane, request: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, PeerError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let connection = tokio::time::timeout_at(deadline, self.connection(lane))
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
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(PeerError::Disconnected(self.to)),
            Err(_) => {
                connection.pending.lock().expect("pending lock").remove(&id);
                Err(PeerError::TimedOut(self.to, timeout))
            }
        }
    }

    async fn connection(&self, lane: Lane) -> Result<Arc<Connection>, PeerError> {
        let link = &self.lanes[lane.index()];
        let mut slot = link.connection.lock().await;
        if let Some(connection) = slot.as_ref().filter(|c| !c.closed.load(Ordering::Acquire)) {
            return Ok(connection.clone());
        }
        if let Some((at, error)) = link.last_failure.lock().expect("failure lock").clone()
            && at.elapsed() < RECONNECT_PAUSE
        {
            return Err(error);
        }
        match self.connect().await {
            Ok(connection) => {
                *slot = Some(connection.clone());
                *link.last_failure.lock().expect("failure lock") = None;
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
                *link.last_failure.lock().expect("failure lock") = Some((Instant::now(), error.clone()));
                let mut down_since = self.down_since.lock().expect("down lock");
                if down_since.is_none() {
                    *down_since = Some(Instant::now());
                    tracing::warn!(peer = self.to, ?lane, %error, "peer unreachable; retrying (logged again once it is back)");
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
        let (id, answer) = match frame {
            Frame::Response { id, body } => (id, Ok(body)),
            Frame::AnswerTooLarge { id, bytes } => (
                id,
                Err(PeerError::AnswerTooLarge(
                    connection.to,
                    usize::try_from(bytes).unwrap_or(usize::MAX),
                )),
            ),
            Frame::Request { .. } => continue,
        };
        if let Some(waiting) = connection.pending.lock().expect("pending lock").remove(&id) {
            let _ = waiting.send(answer);
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
            let _ = outgoing.send(answer_frame(from, id, response)).await;
            drop(permit);
        });
    }
    drop(outgoing);
    let _ = writer_task.await;
}

#[cfg(test)]
mod tests;
