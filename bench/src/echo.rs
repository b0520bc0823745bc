//! The transport baseline: a bare Phoenix V2 WebSocket server with no persistence. It answers a
//! `send` the way FleetLM does on the wire (an ok reply with a seq, and the message pushed back
//! to the sender), so the difference to FleetLM is the cost of durability and bookkeeping.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Starts the echo server on 127.0.0.1 and returns its base URL.
pub async fn start() -> anyhow::Result<String> {
    let app = axum::Router::new().route("/socket/websocket", axum::routing::get(upgrade));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let listener = axum::serve::ListenerExt::tap_io(listener, |stream| {
        let _ = stream.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(base)
}

/// Frames written before one flush, as FleetLM's socket writer does.
const MAX_FRAMES_PER_FLUSH: usize = 64;
/// Frames waiting for one socket's writer (FleetLM's default outbound queue).
const OUTBOUND_QUEUE: usize = 1024;

async fn upgrade(upgrade: WebSocketUpgrade) -> Response {
    upgrade
        .protocols(["phoenix"])
        .read_buffer_size(4096)
        // Frames are buffered until the writer flushes what it has queued, as in FleetLM.
        .write_buffer_size(64 * 1024)
        .on_upgrade(serve)
}

/// Reads frames and queues the answers; a writer task drains the queue and writes everything
/// queued with one flush (one syscall per batch), the way FleetLM's sockets write.
async fn serve(socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let (out, mut outgoing) = tokio::sync::mpsc::channel::<Message>(OUTBOUND_QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(message) = outgoing.recv().await {
            let mut written = sink.feed(message).await.is_ok();
            let mut batched = 1;
            while written && batched < MAX_FRAMES_PER_FLUSH {
                let Ok(message) = outgoing.try_recv() else { break };
                written = sink.feed(message).await.is_ok();
                batched += 1;
            }
            if !written || sink.flush().await.is_err() {
                return;
            }
        }
    });
    while let Some(Ok(Message::Text(text))) = stream.next().await {
        let Ok(frame) = serde_json::from_str::<Vec<Value>>(text.as_str()) else {
            continue;
        };
        let [join_ref, reference, topic, event, payload] = &frame[..] else {
            continue;
        };
        let reply = |response: String| {
            format!(r#"[{join_ref},{reference},{topic},"phx_reply",{{"status":"ok","response":{response}}}]"#)
        };
        let frames = match event.as_str() {
            Some("send") => {
                let seq = SEQ.fetch_add(1, Ordering::Relaxed) + 1;
                let message = serde_json::json!({"seq": seq, "content": payload["content"]["content"]});
                vec![
                    reply(format!(r#"{{"seq":{seq}}}"#)),
                    format!(r#"[{join_ref},null,{topic},"message",{message}]"#),
                ]
            }
            _ => vec![reply("{}".into())],
        };
        for frame in frames {
            if out.send(Message::text(frame)).await.is_err() {
                return;
            }
        }
    }
    drop(out);
    let _ = writer.await;
}
