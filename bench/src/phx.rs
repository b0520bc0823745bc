//! A minimal Phoenix Channels V2 client for load generation.

use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Stream = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct PhxClient {
    pub sink: SplitSink<Stream, Message>,
    pub stream: SplitStream<Stream>,
    next_ref: u64,
}

impl PhxClient {
    pub async fn connect(base: &str, identity_param: &str) -> anyhow::Result<PhxClient> {
        let url = format!(
            "{}/socket/websocket?vsn=2.0.0&{identity_param}",
            base.replacen("http://", "ws://", 1)
        );
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .context("websocket connect")?;
        let (sink, stream) = stream.split();
        Ok(PhxClient {
            sink,
            stream,
            next_ref: 1,
        })
    }

    pub fn next_ref(&mut self) -> u64 {
        self.next_ref += 1;
        self.next_ref
    }

    pub async fn send_frame(&mut self, text: String) -> anyhow::Result<()> {
        self.sink.send(Message::text(text)).await.context("websocket send")
    }

    /// Joins `topic` and returns the reply's response (error if refused).
    pub async fn join(&mut self, topic: &str, payload: &str) -> anyhow::Result<Value> {
        let reference = self.next_ref();
        self.send_frame(format!(
            r#"["{reference}","{reference}","{topic}","phx_join",{payload}]"#
        ))
        .await?;
        loop {
            let frame = self.next_frame().await?;
            if frame[1] == Value::String(reference.to_string()) {
                if frame[4]["status"] != "ok" {
                    bail!("join of {topic} refused: {}", frame[4]);
                }
                return Ok(frame[4]["response"].clone());
            }
        }
    }

    pub async fn next_frame(&mut self) -> anyhow::Result<Value> {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), self.stream.next())
                .await
                .context("no frame within 30 s")?
                .context("socket closed")??;
            if let Message::Text(text) = message {
                return Ok(serde_json::from_str(&text)?);
            }
        }
    }
}
