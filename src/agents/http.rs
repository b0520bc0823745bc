//! The webhook HTTP clients: one pooled client per protocol mode, built once and shared by every
//! dispatch (connections are kept and reused across dispatches, and an HTTP/2 connection carries
//! many dispatches at once).
//!
//! - `negotiated`: `http://` origins get HTTP/1.1; `https://` origins offer `h2` and `http/1.1`
//!   by ALPN and use HTTP/2 whenever the agent accepts it, whatever the agent's `http2` says.
//! - `h2c`: HTTP/2 with prior knowledge, for `http://` origins of agents registered with
//!   `http2: true` (an HTTP/1.1-only agent fails with [`NOT_HTTP2`]).
//!
//! Neither follows redirects: a webhook call carries the agent's secret `headers`, and a
//! redirect would hand them (and the conversation) to whatever host the answer names. Same-origin
//! redirects are not followed either: the registered URL is the one to call, a POST body is not
//! re-sent on 301/302 anyway, and a 3xx is a misconfiguration the operator should see
//! ([`REDIRECTED`], not retried).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::model::Agent;

/// What members see when an agent registered with `http2: true` does not speak HTTP/2 over
/// `http://` (no URL, no address).
pub const NOT_HTTP2: &str = "the agent does not speak HTTP/2 (it is registered with http2: true)";

/// What members see when the agent answered a redirect (no `location`, no address).
pub const REDIRECTED: &str = "agent answered a redirect";

pub struct WebhookClients {
    negotiated: reqwest::Client,
    h2c: reqwest::Client,
}

impl WebhookClients {
    /// Both clients; `extra_roots` are trusted for `https://` agents besides the built-in
    /// roots (the `agent_ca_file` setting).
    pub fn new(extra_roots: &[reqwest::Certificate]) -> Result<WebhookClients, reqwest::Error> {
        let builder = || {
            let mut builder = reqwest::Client::builder()
                .pool_idle_timeout(Duration::from_secs(90))
                .redirect(reqwest::redirect::Policy::none());
            for root in extra_roots {
                builder = builder.add_root_certificate(root.clone());
            }
            builder
        };
        Ok(WebhookClients {
            negotiated: builder().build()?,
            h2c: builder().http2_prior_knowledge().build()?,
        })
    }

    /// The client for this agent's webhook.
    pub fn for_agent(&self, agent: &Agent) -> &reqwest::Client {
        if uses_h2c(agent) { &self.h2c } else { &self.negotiated }
    }
}

/// Whether the agent is called over cleartext HTTP/2 with prior knowledge.
pub fn uses_h2c(agent: &Agent) -> bool {
    agent.http2
        && agent
            .origin_url
            .get(..7)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("http://"))
}

/// Whether a failed request to an h2c agent failed because the agent does not speak HTTP/2.
/// An HTTP/1.1 server either answers HTTP/2's connection preface with an HTTP/1.1 error
/// response (a protocol error here) or just closes the connection (which a crashing HTTP/2
/// server might do too); in the second case a probe of the origin tells them apart.
pub async fn failed_for_want_of_http2(agent: &Agent, error: &reqwest::Error) -> bool {
    if is_h2_protocol_error(error) {
        return true;
    }
    if error.is_timeout() || !is_connection_lost(error) {
        return false;
    }
    probe_h2c(&agent.origin_url, Duration::from_secs(2)).await == Some(false)
}

/// The connection was closed or reset under the request.
fn is_connection_lost(error: &reqwest::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = cause.source();
    }
    false
}

/// Asks the origin whether it speaks cleartext HTTP/2: sends the client connection preface
/// and an empty SETTINGS frame (no request) and reads the first frame header. `Some(true)` for
/// a SETTINGS frame (every HTTP/2 server sends one first), `Some(false)` for anything else (an
/// HTTP/1.1 response, a close), `None` when the origin cannot be reached to ask.
pub async fn probe_h2c(origin_url: &str, within: Duration) -> Option<bool> {
    let url = url::Url::parse(origin_url).ok()?;
    let host = url
        .host_str()?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = url.port_or_known_default()?;
    let probe = async move {
        let mut stream = tokio::net::TcpStream::connect((host.as_str(), port)).await.ok()?;
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        if stream.write_all(&hello).await.is_err() {
            return Some(false);
        }
        let mut header = [0u8; 9];
        let mut read = 0;
        while read < header.len() {
            match stream.read(&mut header[read..]).await {
                Ok(0) | Err(_) => return Some(false),
                Ok(n) => read += n,
            }
        }
        // Type SETTINGS on stream 0, without the ACK flag.
        Some(header[3] == 0x4 && header[4] & 0x1 == 0 && header[5..9] == [0, 0, 0, 0])
    };
    tokio::time::timeout(within, probe).await.ok().flatten()
}

/// Whether `error` is an HTTP/2 protocol error detected here on the connection: what an
/// HTTP/1.1 server's answer to the connection preface looks like when parsed as frames.
fn is_h2_protocol_error(error: &reqwest::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            return !h2.is_remote()
                && !h2.is_io()
                && matches!(
                    h2.reason(),
                    Some(h2::Reason::PROTOCOL_ERROR | h2::Reason::FRAME_SIZE_ERROR)
                );
        }
        source = cause.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(origin_url: &str, http2: bool) -> Agent {
        Agent {
            id: "a".into(),
            name: "a".into(),
            origin_url: origin_url.into(),
            webhook_path: "/webhook".into(),
            message_history_mode: crate::model::HistoryMode::Tail,
            message_history_limit: 50,
            timeout_ms: 1000,
            debounce_window_ms: 0,
            headers: Default::default(),
            http2,
            status: crate::model::AgentStatus::Enabled,
            inserted_at: crate::model::Timestamp(0),
            updated_at: crate::model::Timestamp(0),
            signing: Default::default(),
        }
    }

    /// A real hyper server on 127.0.0.1:0 answering 204, speaking only HTTP/2 (prior
    /// knowledge) or only HTTP/1.1.
    async fn server(http2: bool) -> String {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let io = hyper_util::rt::TokioIo::new(stream);
                let service = service_fn(|_request| async {
                    let mut response = hyper::Response::new(http_body_util::Empty::<bytes::Bytes>::new());
                    *response.status_mut() = hyper::StatusCode::NO_CONTENT;
                    Ok::<_, std::convert::Infallible>(response)
                });
                tokio::spawn(async move {
                    let _ = if http2 {
                        hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                            .serve_connection(io, service)
                            .await
                    } else {
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await
                    };
                });
            }
        });
        origin
    }

    #[tokio::test]
    async fn the_probe_tells_http2_servers_from_http1_ones() {
        let within = Duration::from_secs(5);
        assert_eq!(probe_h2c(&server(true).await, within).await, Some(true));
        assert_eq!(probe_h2c(&server(false).await, within).await, Some(false));
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert_eq!(
            probe_h2c(&format!("http://{closed}"), within).await,
            None,
            "unknown: not reachable"
        );
    }

    #[tokio::test]
    async fn the_h2c_client_speaks_http2_and_fails_clearly_on_http1() {
        let clients = WebhookClients::new(&[]).unwrap();
        let h2 = agent(&server(true).await, true);
        let response = clients
            .for_agent(&h2)
            .post(format!("{}/webhook", h2.origin_url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        let plain = agent(&h2.origin_url, false);
        let refused = clients
            .for_agent(&plain)
            .post(format!("{}/webhook", plain.origin_url))
            .send()
            .await;
        assert!(refused.is_err(), "an HTTP/1.1 request to an HTTP/2-only server fails");

        let h1 = agent(&server(false).await, true);
        let error = clients
            .for_agent(&h1)
            .post(format!("{}/webhook", h1.origin_url))
            .send()
            .await
            .unwrap_err();
        assert!(failed_for_want_of_http2(&h1, &error).await, "{error:?}");
        let response = clients
            .for_agent(&agent(&h1.origin_url, false))
            .post(format!("{}/webhook", h1.origin_url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_11);
    }

    #[test]
    fn only_cleartext_http2_agents_use_prior_knowledge() {
        assert!(uses_h2c(&agent("http://127.0.0.1:9000", true)));
        assert!(uses_h2c(&agent("HTTP://bot.internal", true)));
        assert!(!uses_h2c(&agent("http://127.0.0.1:9000", false)));
        // TLS origins negotiate by ALPN, whatever `http2` says.
        assert!(!uses_h2c(&agent("https://bot.example", true)));
        assert!(!uses_h2c(&agent("https://bot.example", false)));
    }
}
