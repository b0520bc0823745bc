//! The peer transport between real sockets on 127.0.0.1.

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
    let calls = (0u8..50).map(|i| good.call(Lane::Application, vec![i], timeout));
    for (i, answer) in futures_util::future::join_all(calls).await.into_iter().enumerate() {
        let mut expected = 1u64.to_be_bytes().to_vec();
        expected.push(i as u8);
        assert_eq!(answer.expect("answered"), expected);
    }

    let wrong_secret = PeerClient::new(identity(1, "another-secret-entirely"), 2, addr.to_string());
    let error = wrong_secret
        .call(Lane::Application, vec![1], timeout)
        .await
        .expect_err("refused");
    assert!(matches!(error, PeerError::Refused(2, _)), "{error:?}");

    let stranger = PeerClient::new(identity(9, "s3cret-s3cret-s3cret"), 2, addr.to_string());
    let error = stranger
        .call(Lane::Application, vec![1], timeout)
        .await
        .expect_err("refused");
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
        .call(Lane::Application, vec![1], timeout)
        .await
        .expect_err("refused");
    assert!(
        matches!(&error, PeerError::Refused(2, reason)
            if reason.contains("node 1 has shards=8 members=1,2, node 2 has shards=1 members=1,2")),
        "{error:?}"
    );

    let wrong_node = PeerClient::new(identity(1, "s3cret-s3cret-s3cret"), 3, addr.to_string());
    let error = wrong_node
        .call(Lane::Application, vec![1], timeout)
        .await
        .expect_err("refused");
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
    let answer = client
        .call(Lane::Application, vec![7u8; 1000], Duration::from_secs(5))
        .await;
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
    let error = client
        .call(Lane::Application, vec![1], Duration::from_secs(5))
        .await
        .expect_err("refused");
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
        .call(Lane::Application, vec![1], Duration::from_secs(5))
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
    assert!(
        client
            .call(Lane::Application, vec![7], Duration::from_secs(5))
            .await
            .is_ok()
    );
}

/// Answers `[0xFF]` with more than `MAX_ANSWER_BYTES`, holds `[0xAA]` unanswered for a minute,
/// and echoes anything else.
struct Picky;
impl PeerHandler for Picky {
    fn handle(&self, from: u64, request: Vec<u8>) -> Pin<Box<dyn Future<Output = Vec<u8>> + Send>> {
        Box::pin(async move {
            match request.as_slice() {
                [0xFF] => vec![7u8; MAX_ANSWER_BYTES + 1],
                [0xAA] => {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Vec::new()
                }
                _ => Echo.handle(from, request).await,
            }
        })
    }
}

async fn picky_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = watch::channel(false);
    std::mem::forget(stop);
    tokio::spawn(serve(
        listener,
        identity(2, "s3cret-s3cret-s3cret"),
        vec![1, 2],
        Arc::new(Picky),
        stopped,
    ));
    addr
}

/// An answer over the limit fails its own call with a clear error; the calls beside it on the
/// same connection are answered, and the connection stays up.
#[tokio::test]
async fn an_answer_over_the_limit_fails_that_call_alone() {
    let client = PeerClient::new(identity(1, "s3cret-s3cret-s3cret"), 2, picky_server().await.to_string());
    let timeout = Duration::from_secs(10);
    assert!(client.call(Lane::Application, vec![1], timeout).await.is_ok());
    let first = client.lanes[Lane::Application.index()]
        .connection
        .lock()
        .await
        .clone()
        .expect("connected");
    let big = client.call(Lane::Application, vec![0xFF], timeout);
    let small = futures_util::future::join_all((0u8..20).map(|i| client.call(Lane::Application, vec![i], timeout)));
    let (big, small) = tokio::join!(big, small);
    match &big {
        Err(PeerError::AnswerTooLarge(2, bytes)) => assert!(*bytes > MAX_ANSWER_BYTES, "{bytes}"),
        other => panic!("an oversized answer came back as {:?}", other.as_ref().map(Vec::len)),
    }
    assert!(
        big.unwrap_err().to_string().contains("answer limit"),
        "the error says what happened"
    );
    for (i, answer) in small.into_iter().enumerate() {
        assert_eq!(answer.expect("answered").last(), Some(&(i as u8)));
    }
    assert!(client.call(Lane::Application, vec![9], timeout).await.is_ok());
    let still = client.lanes[Lane::Application.index()]
        .connection
        .lock()
        .await
        .clone()
        .expect("connected");
    assert!(Arc::ptr_eq(&first, &still), "the connection was dropped and made again");
}

/// The application lane is saturated (every request it may have in progress at the callee is
/// held): a control-lane call is still answered at once, on its own connection.
#[tokio::test]
async fn a_saturated_application_lane_does_not_delay_the_control_lane() {
    let client = Arc::new(PeerClient::new(
        identity(1, "s3cret-s3cret-s3cret"),
        2,
        picky_server().await.to_string(),
    ));
    for _ in 0..MAX_IN_PROGRESS + 16 {
        let client = client.clone();
        tokio::spawn(async move {
            let _ = client
                .call(Lane::Application, vec![0xAA], Duration::from_secs(30))
                .await;
        });
    }
    // The held requests reach the callee first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let queued = client
        .call(Lane::Application, vec![3], Duration::from_millis(500))
        .await;
    assert!(
        matches!(queued, Err(PeerError::TimedOut(2, _))),
        "the application lane is not saturated: {queued:?}"
    );
    let started = Instant::now();
    let answer = client.call(Lane::Control, vec![4], Duration::from_secs(2)).await;
    assert_eq!(answer.expect("answered").last(), Some(&4));
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
}
