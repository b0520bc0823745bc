//! Real HTTP agents for the engine tests: an axum server on 127.0.0.1:0 that records every
//! webhook call and answers as the test's `Behavior` says, streaming its body line by line. By
//! default served by `axum::serve`; `TestAgent::serve` picks the protocol exactly (HTTP/1.1
//! only, HTTP/2 with prior knowledge, or TLS with a chosen ALPN offer) through hyper itself.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{Value, json};

#[derive(Clone)]
pub enum Behavior {
    /// Echoes the last user message's text as AI SDK chunks (JSONL).
    EchoJsonl,
    /// The same chunks as Server-Sent Events, ending with `data: [DONE]`.
    EchoSse,
    /// One legacy `{kind, content, metadata}` line.
    Legacy,
    /// Waits this long before answering like `EchoJsonl`.
    Slow(Duration),
    /// Answers 503 (with `retry-after: 0`) this many times, then like `EchoJsonl`.
    Flaky(usize),
    /// Always 400.
    Refuse,
    /// Always `307 Temporary Redirect` (a follower re-sends the same POST, headers and all)
    /// with this `location` (e.g. another agent's webhook URL).
    Redirect(String),
    /// A line that is not JSON.
    Malformed,
    /// Text chunks but no `finish`.
    NoFinish,
    /// Twenty text deltas, one every 50 ms, then `finish`.
    Dribble,
    /// A reply line of 1.1 MiB.
    HugeLine,
    /// A plain, pretty-printed `application/json` UI message (not streamed).
    PlainJson,
    /// The `EchoJsonl` chunks as JSON lines, 30 ms apart, declared `content-type:
    /// application/json` (as many hand-written handlers do).
    JsonlDeclaredJson,
    /// The `EchoJsonl` chunks with a `start` that names no `messageId` (as the AI SDK's
    /// `toUIMessageStreamResponse()` without `originalMessages` sends).
    EchoWithoutMessageId,
    /// `start` (messageId `reply-<call>`), `text-start` and `before` text deltas ("0 ", "1 ",
    /// …) 20 ms apart, then holds the reply open until `release()`; then `after` more deltas,
    /// `text-end` and `finish`. Records a reply whose connection closed before its end
    /// (`aborted()`).
    Gated { before: usize, after: usize },
    /// The first call streams `start`, `text-start` and one delta, then breaks the connection;
    /// later calls answer like `EchoJsonl`.
    CutOnce,
    /// A reply of `messages` whole messages ("part 0", "part 1", …, each from `start` to
    /// `finish`, message ids `part-<n>`). The first call streams only the first `hold_after` of
    /// them and then holds the reply open (until FleetLM closes the connection, e.g. because it
    /// was killed); later calls stream all of them.
    Parts { messages: usize, hold_after: usize },
    /// As the AI SDK's `streamText` with a tool that needs approval: the first call asks for
    /// the approval of a `deleteFile` call in message `m1` and finishes; every later call
    /// continues `m1` (its `start` names it) with the tool's output and a text, without naming
    /// the tool call again.
    ApprovalThenContinue,
}

#[derive(Clone, Debug)]
pub struct Call {
    pub body: Value,
    /// The body's bytes exactly as received (what a signature covers).
    pub raw_body: String,
    pub headers: HeaderMap,
    /// The HTTP version the call came in with.
    pub version: Version,
    /// When the call arrived.
    pub at: std::time::Instant,
}

struct AgentState {
    behavior: Behavior,
    calls: Mutex<Vec<Call>>,
    in_flight: Mutex<(usize, usize)>,
    /// Gated replies may go on (one permit per reply).
    gate: tokio::sync::Semaphore,
    /// Gated replies whose body was dropped (the client closed the connection) before its end.
    aborted: std::sync::atomic::AtomicUsize,
}

pub struct TestAgent {
    pub url: String,
    state: Arc<AgentState>,
    connections: Arc<AtomicUsize>,
}

/// How `TestAgent::serve` speaks.
#[derive(Clone)]
pub enum Transport {
    /// Cleartext HTTP/1.1 only (HTTP/2's connection preface is refused as HTTP/1.1 refuses it).
    Http1Only,
    /// Cleartext HTTP/2 only, with prior knowledge (h2c).
    H2c,
    /// TLS with a certificate for 127.0.0.1 issued by `ca`, offering these ALPN protocols
    /// (`h2`, `http/1.1`) and serving whichever the client picks.
    Tls { ca: Arc<TestCa>, alpn: Vec<&'static str> },
}

/// A certificate authority made for one test (rcgen), and its certificate as a PEM file for
/// the server's `agent_ca_file`.
pub struct TestCa {
    certificate: rcgen::Certificate,
    key: rcgen::KeyPair,
    pub pem_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new() -> Arc<TestCa> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "FleetLM test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let certificate = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pem_file = dir.path().join("ca.pem");
        std::fs::write(&pem_file, certificate.pem()).unwrap();
        Arc::new(TestCa {
            certificate,
            key,
            pem_file,
            _dir: dir,
        })
    }

    /// A TLS server configuration for `127.0.0.1` and `localhost`, issued by this CA.
    pub fn server_config(&self, alpn: &[&str]) -> rustls::ServerConfig {
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = params.signed_by(&key, &self.certificate, &self.key).unwrap();
        let chain = vec![leaf.der().clone()];
        let private_key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, private_key)
                .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        config
    }
}

impl TestAgent {
    pub async fn start(behavior: Behavior) -> TestAgent {
        Self::start_on("127.0.0.1:0", behavior).await
    }

    /// Starts on a given address (to bring an agent up where a registered one was down).
    pub async fn start_on(address: &str, behavior: Behavior) -> TestAgent {
        let state = Arc::new(AgentState {
            behavior,
            calls: Mutex::default(),
            in_flight: Mutex::default(),
            gate: tokio::sync::Semaphore::new(0),
            aborted: std::sync::atomic::AtomicUsize::new(0),
        });
        let app = axum::Router::new()
            .route("/webhook", axum::routing::post(webhook))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(address).await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        TestAgent {
            url,
            state,
            connections: Arc::default(),
        }
    }

    /// Starts on 127.0.0.1:0 speaking exactly as `transport` says.
    pub async fn serve(behavior: Behavior, transport: Transport) -> TestAgent {
        let state = Arc::new(AgentState {
            behavior,
            calls: Mutex::default(),
            in_flight: Mutex::default(),
            gate: tokio::sync::Semaphore::new(0),
            aborted: std::sync::atomic::AtomicUsize::new(0),
        });
        let app = axum::Router::new()
            .route("/webhook", axum::routing::post(webhook))
            .with_state(state.clone());
        let service = hyper_util::service::TowerToHyperService::new(app);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let url = match transport {
            Transport::Tls { .. } => format!("https://{address}"),
            _ => format!("http://{address}"),
        };
        let tls = match &transport {
            Transport::Tls { ca, alpn } => Some(tokio_rustls::TlsAcceptor::from(Arc::new(ca.server_config(alpn)))),
            _ => None,
        };
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let (service, transport, tls) = (service.clone(), transport.clone(), tls.clone());
                tokio::spawn(async move {
                    let http1 = hyper::server::conn::http1::Builder::new();
                    let http2 = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
                    let _ = match (transport, tls) {
                        (Transport::Http1Only, _) => {
                            http1
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await
                        }
                        (Transport::H2c, _) => {
                            http2
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await
                        }
                        (Transport::Tls { .. }, Some(acceptor)) => {
                            let Ok(stream) = acceptor.accept(stream).await else {
                                return;
                            };
                            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                            let io = hyper_util::rt::TokioIo::new(stream);
                            if h2 {
                                http2.serve_connection(io, service).await
                            } else {
                                http1.serve_connection(io, service).await
                            }
                        }
                        (Transport::Tls { .. }, None) => unreachable!(),
                    };
                });
            }
        });
        TestAgent {
            url,
            state,
            connections,
        }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().unwrap().clone()
    }

    /// Lets one held (`Gated`) reply go on.
    pub fn release(&self) {
        self.state.gate.add_permits(1);
    }

    /// Takes back release permits no reply took.
    pub fn drain_permits(&self) {
        while let Ok(permit) = self.state.gate.try_acquire() {
            permit.forget();
        }
    }

    /// Gated replies whose connection FleetLM closed before the reply's end.
    pub fn aborted(&self) -> usize {
        self.state.aborted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits (up to 10 s) until `count` gated replies were aborted by FleetLM.
    pub async fn wait_aborted(&self, count: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.aborted() < count {
            assert!(
                std::time::Instant::now() < deadline,
                "the agent's request was not closed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// TCP connections accepted so far (`serve` only).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// The most dispatches this agent ever had running at once.
    pub fn max_concurrent(&self) -> usize {
        self.state.in_flight.lock().unwrap().1
    }
}

fn chunks(text: &str) -> Vec<Value> {
    vec![
        json!({"type": "start", "messageId": "reply-1"}),
        json!({"type": "start-step"}),
        json!({"type": "text-start", "id": "t"}),
        json!({"type": "text-delta", "id": "t", "delta": "echo: "}),
        json!({"type": "text-delta", "id": "t", "delta": text}),
        json!({"type": "text-end", "id": "t"}),
        json!({"type": "finish-step"}),
        json!({"type": "finish"}),
    ]
}

/// Counts a gated reply as aborted if its body is dropped before its last line.
struct BodyGuard {
    state: Arc<AgentState>,
    finished: bool,
}

impl Drop for BodyGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.state.aborted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

fn gated(state: Arc<AgentState>, call_number: usize, before: usize, after: usize) -> Response {
    let guard = BodyGuard { state, finished: false };
    let stream = futures_util::stream::unfold((0usize, guard), move |(step, mut guard)| async move {
        let delta = |n: usize| json!({"type": "text-delta", "id": "t", "delta": format!("{n} ")});
        let chunk = if step == 0 {
            json!({"type": "start", "messageId": format!("reply-{call_number}")})
        } else if step == 1 {
            json!({"type": "text-start", "id": "t"})
        } else if step < 2 + before {
            tokio::time::sleep(Duration::from_millis(20)).await;
            delta(step - 2)
        } else if step < 2 + before + after {
            if step == 2 + before {
                guard.state.gate.acquire().await.unwrap().forget();
            }
            delta(step - 2)
        } else if step == 2 + before + after {
            if after == 0 {
                guard.state.gate.acquire().await.unwrap().forget();
            }
            json!({"type": "text-end", "id": "t"})
        } else if step == 3 + before + after {
            json!({"type": "finish"})
        } else {
            guard.finished = true;
            drop(guard);
            return None;
        };
        Some((
            Ok::<_, std::convert::Infallible>(format!("{chunk}\n")),
            (step + 1, guard),
        ))
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// The chunks of message `n` of a `Parts` reply.
fn part_chunks(n: usize) -> Vec<Value> {
    vec![
        json!({"type": "start", "messageId": format!("part-{n}")}),
        json!({"type": "text-start", "id": "t"}),
        json!({"type": "text-delta", "id": "t", "delta": format!("part {n}")}),
        json!({"type": "text-end", "id": "t"}),
        json!({"type": "finish"}),
    ]
}

fn last_user_text(body: &Value) -> String {
    let user = body["user_id"].as_str().unwrap_or_default();
    body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["sender_id"] == user))
        .and_then(|m| m["content"]["text"].as_str())
        .unwrap_or_default()
        .to_string()
}

fn streamed(lines: Vec<String>) -> Response {
    let stream = futures_util::stream::iter(
        lines
            .into_iter()
            .map(|line| Ok::<_, std::convert::Infallible>(format!("{line}\n"))),
    );
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap()
}

async fn webhook(
    State(state): State<Arc<AgentState>>,
    version: Version,
    headers: HeaderMap,
    raw_body: String,
) -> Response {
    let body: Value = serde_json::from_str(&raw_body).unwrap();
    let call_number = {
        let mut calls = state.calls.lock().unwrap();
        calls.push(Call {
            body: body.clone(),
            raw_body,
            headers,
            version,
            at: std::time::Instant::now(),
        });
        calls.len()
    };
    {
        let mut in_flight = state.in_flight.lock().unwrap();
        in_flight.0 += 1;
        in_flight.1 = in_flight.1.max(in_flight.0);
    }
    let text = last_user_text(&body);
    let jsonl = |text: &str| chunks(text).iter().map(Value::to_string).collect::<Vec<_>>();
    let response = match &state.behavior {
        Behavior::EchoJsonl => streamed(jsonl(&text)),
        Behavior::EchoSse => {
            let mut lines: Vec<String> = chunks(&text).iter().map(|c| format!("data: {c}\n")).collect();
            lines.push("data: [DONE]\n".into());
            streamed(lines)
        }
        Behavior::Legacy => streamed(vec![
            json!({"kind": "text", "content": {"text": format!("legacy: {text}")}}).to_string(),
        ]),
        Behavior::Slow(delay) => {
            tokio::time::sleep(*delay).await;
            streamed(jsonl(&text))
        }
        Behavior::Flaky(failures) if call_number <= *failures => {
            (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "0")], "busy").into_response()
        }
        Behavior::Flaky(_) => streamed(jsonl(&text)),
        Behavior::Refuse => (StatusCode::BAD_REQUEST, "{\"type\":\"text-start\"}").into_response(),
        Behavior::Redirect(location) => {
            (StatusCode::TEMPORARY_REDIRECT, [("location", location.clone())]).into_response()
        }
        Behavior::Malformed => streamed(vec!["{\"type\":\"start\"}".into(), "this is not json".into()]),
        Behavior::Dribble => {
            let mut lines = vec![json!({"type": "text-start", "id": "t"}).to_string()];
            lines.extend(
                (0..20).map(|n| json!({"type": "text-delta", "id": "t", "delta": format!("{n} ")}).to_string()),
            );
            lines.push(json!({"type": "text-end", "id": "t"}).to_string());
            lines.push(json!({"type": "finish"}).to_string());
            let stream = futures_util::stream::iter(lines).then(|line| async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<_, std::convert::Infallible>(format!("{line}\n"))
            });
            Response::builder()
                .header("content-type", "application/x-ndjson")
                .body(Body::from_stream(stream))
                .unwrap()
        }
        Behavior::HugeLine => {
            let delta = "x".repeat(1_150_000);
            streamed(vec![
                json!({"type": "text-delta", "id": "t", "delta": delta}).to_string(),
            ])
        }
        Behavior::PlainJson => {
            let message = json!({"id": "m1", "role": "assistant",
                "parts": [{"type": "text", "text": format!("plain: {text}")}]});
            (
                [("content-type", "application/json")],
                serde_json::to_string_pretty(&message).unwrap(),
            )
                .into_response()
        }
        Behavior::JsonlDeclaredJson => {
            let stream = futures_util::stream::iter(jsonl(&text)).then(|line| async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                Ok::<_, std::convert::Infallible>(format!("{line}\n"))
            });
            Response::builder()
                .header("content-type", "application/json")
                .body(Body::from_stream(stream))
                .unwrap()
        }
        Behavior::EchoWithoutMessageId => {
            let mut lines = jsonl(&text);
            lines[0] = json!({"type": "start"}).to_string();
            streamed(lines)
        }
        Behavior::CutOnce if call_number == 1 => {
            let lines: Vec<Result<String, std::io::Error>> = vec![
                Ok(format!("{}\n", json!({"type": "start", "messageId": "cut"}))),
                Ok(format!("{}\n", json!({"type": "text-start", "id": "t"}))),
                Ok(format!(
                    "{}\n",
                    json!({"type": "text-delta", "id": "t", "delta": "half"})
                )),
                Err(std::io::Error::other("cut")),
            ];
            let stream = futures_util::stream::iter(lines).then(|line| async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                line
            });
            Response::builder()
                .header("content-type", "application/x-ndjson")
                .body(Body::from_stream(stream))
                .unwrap()
        }
        Behavior::CutOnce => streamed(jsonl(&text)),
        Behavior::Gated { before, after } => gated(state.clone(), call_number, *before, *after),
        Behavior::ApprovalThenContinue if call_number == 1 => streamed(
            [
                json!({"type": "start", "messageId": "m1"}),
                json!({"type": "start-step"}),
                json!({"type": "tool-input-available", "toolCallId": "c1", "toolName": "deleteFile", "input": {"path": "/tmp/x"}}),
                json!({"type": "tool-approval-request", "approvalId": "a1", "toolCallId": "c1"}),
                json!({"type": "finish-step"}),
                json!({"type": "finish", "finishReason": "tool-calls"}),
            ]
            .iter()
            .map(Value::to_string)
            .collect(),
        ),
        Behavior::ApprovalThenContinue => streamed(
            [
                json!({"type": "start", "messageId": "m1"}),
                json!({"type": "start-step"}),
                json!({"type": "tool-output-available", "toolCallId": "c1", "output": {"deleted": true}}),
                json!({"type": "finish-step"}),
                json!({"type": "start-step"}),
                json!({"type": "text-start", "id": "t1"}),
                json!({"type": "text-delta", "id": "t1", "delta": "Deleted."}),
                json!({"type": "text-end", "id": "t1"}),
                json!({"type": "finish-step"}),
                json!({"type": "finish", "finishReason": "stop"}),
            ]
            .iter()
            .map(Value::to_string)
            .collect(),
        ),
        Behavior::Parts { messages, hold_after } => {
            let count = if call_number == 1 { *hold_after } else { *messages };
            let lines: Vec<String> = (0..count).flat_map(part_chunks).map(|c| format!("{c}\n")).collect();
            let body = futures_util::stream::iter(lines.into_iter().map(Ok::<_, std::convert::Infallible>));
            let response = if call_number == 1 {
                Body::from_stream(body.chain(futures_util::stream::pending()))
            } else {
                Body::from_stream(body)
            };
            Response::builder()
                .header("content-type", "application/x-ndjson")
                .body(response)
                .unwrap()
        }
        Behavior::NoFinish => {
            let mut lines = jsonl(&text);
            lines.truncate(5);
            streamed(lines)
        }
    };
    state.in_flight.lock().unwrap().0 -= 1;
    response
}
