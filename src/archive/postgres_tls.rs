//! TLS to Postgres with rustls (no OpenSSL), chosen by `sslmode` in the database URL, as libpq
//! reads it:
//!
//! - `disable`: never TLS.
//! - `prefer` (the default, as in libpq): TLS if the server offers it, plain otherwise; the
//!   certificate is not checked (encryption against passive listeners only).
//! - `require`: TLS or no connection; the certificate is not checked, unless `sslrootcert` is
//!   given (then as `verify-ca`, as libpq does).
//! - `verify-ca`: TLS, and the server's certificate must chain to a trusted root.
//! - `verify-full`: as `verify-ca`, and the certificate must name the host connected to.
//!
//! Trusted roots for `verify-*`: the PEM file `sslrootcert=/path/ca.pem`, or, without it (or
//! with `sslrootcert=system`), the bundled Mozilla roots (`webpki-roots`).
//! `tokio_postgres` knows only `disable`/`prefer`/`require`, so both parameters are taken out of
//! the URL here and the rest is parsed by `tokio_postgres`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// How to reach the database: the parsed configuration and the TLS connector it uses.
pub struct PostgresTarget {
    pub config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
    /// The mode asked for (for messages).
    pub sslmode: &'static str,
}

/// Parses a database URL (`postgres://…` or `postgresql://…`, or libpq's `key=value` form,
/// where only `disable`/`prefer`/`require` are known), reading `sslmode` and `sslrootcert`.
/// Errors are meant for the operator and never carry the password.
pub fn parse_database_url(url: &str) -> Result<PostgresTarget, String> {
    let (rest, sslmode, sslrootcert) = take_tls_parameters(url)?;
    let mut config: tokio_postgres::Config = rest
        .parse()
        .map_err(|e| format!("database_url is not a valid Postgres URL ({e})"))?;
    // Without `sslmode` in a URL, tokio_postgres's own reading (its default: prefer).
    let sslmode = sslmode.unwrap_or_else(|| {
        match config.get_ssl_mode() {
            SslMode::Disable => "disable",
            SslMode::Require => "require",
            _ => "prefer",
        }
        .to_string()
    });
    let sslmode = sslmode.as_str();
    let verify = match (sslmode, sslrootcert.is_some()) {
        ("disable", _) => {
            config.ssl_mode(SslMode::Disable);
            Verify::Nothing
        }
        ("prefer", _) => {
            config.ssl_mode(SslMode::Prefer);
            Verify::Nothing
        }
        ("require", false) => {
            config.ssl_mode(SslMode::Require);
            Verify::Nothing
        }
        ("require", true) | ("verify-ca", _) => {
            config.ssl_mode(SslMode::Require);
            Verify::Chain
        }
        ("verify-full", _) => {
            config.ssl_mode(SslMode::Require);
            Verify::ChainAndName
        }
        (other, _) => {
            return Err(format!(
                "database_url: sslmode={other} is not supported (disable, prefer, require, verify-ca, verify-full)"
            ));
        }
    };
    let sslmode = match sslmode {
        "disable" => "disable",
        "prefer" => "prefer",
        "require" => "require",
        "verify-ca" => "verify-ca",
        _ => "verify-full",
    };
    let tls = MakeRustlsConnect::new(verify, sslrootcert.as_deref())?;
    Ok(PostgresTarget { config, tls, sslmode })
}

/// The URL without `sslmode`/`sslrootcert`, and their values (the rest is left as written).
#[allow(clippy::type_complexity)]
fn take_tls_parameters(url: &str) -> Result<(String, Option<String>, Option<String>), String> {
    let lower = url.to_ascii_lowercase();
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), None, None));
    };
    if !(lower.starts_with("postgres://") || lower.starts_with("postgresql://")) {
        // libpq's `key=value` form: tokio_postgres reads `sslmode` itself (no verify-*).
        return Ok((url.to_string(), None, None));
    }
    let (mut sslmode, mut sslrootcert) = (None, None);
    let mut kept = Vec::new();
    for pair in query.split('&') {
        match url::form_urlencoded::parse(pair.as_bytes()).next() {
            Some((key, value)) if key == "sslmode" => sslmode = Some(value.into_owned()),
            Some((key, value)) if key == "sslrootcert" => sslrootcert = Some(value.into_owned()),
            _ => kept.push(pair),
        }
    }
    let rest = match kept.is_empty() {
        true => base.to_string(),
        false => format!("{base}?{}", kept.join("&")),
    };
    Ok((rest, sslmode, sslrootcert))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verify {
    /// Encrypted, the certificate not checked (`prefer`, `require`).
    Nothing,
    /// The chain to a trusted root (`verify-ca`).
    Chain,
    /// The chain and the host name (`verify-full`).
    ChainAndName,
}

/// rustls (ring provider) as `tokio_postgres`'s TLS.
#[derive(Clone)]
pub struct MakeRustlsConnect {
    config: Arc<rustls::ClientConfig>,
}

impl MakeRustlsConnect {
    fn new(verify: Verify, sslrootcert: Option<&str>) -> Result<MakeRustlsConnect, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?;
        let config = match verify {
            Verify::Nothing => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate {
                    algorithms: provider.signature_verification_algorithms,
                }))
                .with_no_client_auth(),
            Verify::Chain | Verify::ChainAndName => {
                let roots = Arc::new(trusted_roots(sslrootcert)?);
                let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| format!("TLS setup: {e}"))?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(CheckChain {
                        webpki,
                        check_name: verify == Verify::ChainAndName,
                    }))
                    .with_no_client_auth()
            }
        };
        Ok(MakeRustlsConnect {
            config: Arc::new(config),
        })
    }
}

fn trusted_roots(sslrootcert: Option<&str>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match sslrootcert {
        None | Some("system") => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(path) => {
            let unreadable = |e: &dyn std::fmt::Display| format!("database_url: cannot read sslrootcert {path}: {e}");
            for certificate in CertificateDer::pem_file_iter(path).map_err(|e| unreadable(&e))? {
                roots
                    .add(certificate.map_err(|e| unreadable(&e))?)
                    .map_err(|e| unreadable(&e))?;
            }
            if roots.is_empty() {
                return Err(format!("database_url: sslrootcert {path} holds no PEM certificate"));
            }
        }
    }
    Ok(roots)
}

/// `verify-ca` and `verify-full`: webpki's checks, the name mismatch forgiven for `verify-ca`.
#[derive(Debug)]
struct CheckChain {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for CheckChain {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            // The name is checked after the chain: this error means the chain is good.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// `prefer` and `require` without a root: any certificate (libpq's behaviour); the handshake's
/// signatures are still checked, so the session is encrypted to whoever holds the key.
#[derive(Debug)]
struct AcceptAnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Whether a connection error is a TLS failure (a certificate refused, a server without TLS
/// under `require`): waiting will not fix it. `tokio_postgres` keeps the kind private; its text
/// is stable.
pub fn is_tls_failure(error: &tokio_postgres::Error) -> bool {
    error.to_string().starts_with("error performing TLS handshake")
}

/// The error with its causes (`tokio_postgres` shows only its kind, e.g. "error performing TLS
/// handshake", and keeps the why — "invalid peer certificate: UnknownIssuer" — in its source).
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl<S> MakeTlsConnect<S> for MakeRustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, Self::Error> {
        Ok(RustlsConnect {
            config: self.config.clone(),
            server_name: ServerName::try_from(domain)?.to_owned(),
        })
    }
}

pub struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let stream = tokio_rustls::TlsConnector::from(self.config)
                .connect(self.server_name, stream)
                .await?;
            Ok(RustlsStream(stream))
        })
    }
}

pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    /// No channel binding: SCRAM works as without TLS (`channel_binding=require` is refused).
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_read_and_taken_out_of_the_url() {
        let (rest, mode, root) = take_tls_parameters(
            "postgres://u:p@db.internal:6432/app?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p@db.internal:6432/app?application_name=x");
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/etc/ca.pem"));
        let (rest, mode, root) = take_tls_parameters("postgres://u@h/db?sslmode=require").unwrap();
        assert_eq!(
            (rest.as_str(), mode.as_deref(), root),
            ("postgres://u@h/db", Some("require"), None)
        );
    }

    #[test]
    fn sslmodes_map_to_what_tokio_postgres_does() {
        for (url, mode, shown) in [
            ("postgres://u@h/db", SslMode::Prefer, "prefer"),
            ("postgres://u@h/db?sslmode=disable", SslMode::Disable, "disable"),
            ("postgres://u@h/db?sslmode=prefer", SslMode::Prefer, "prefer"),
            ("postgres://u@h/db?sslmode=require", SslMode::Require, "require"),
            ("postgres://u@h/db?sslmode=verify-ca", SslMode::Require, "verify-ca"),
            (
                "postgresql://u@h/db?sslmode=verify-full",
                SslMode::Require,
                "verify-full",
            ),
            ("host=h user=u sslmode=require", SslMode::Require, "require"),
            ("host=h user=u", SslMode::Prefer, "prefer"),
        ] {
            let target = parse_database_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(target.config.get_ssl_mode(), mode, "{url}");
            assert_eq!(target.sslmode, shown, "{url}");
        }
    }

    #[test]
    fn bad_tls_settings_are_clear_errors_without_the_password() {
        let error = parse_database_url("postgres://u:hunter2@h/db?sslmode=verify-everything")
            .err()
            .unwrap();
        assert!(error.contains("sslmode=verify-everything is not supported"), "{error}");
        let error = parse_database_url("postgres://u:hunter2@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
            .err()
            .unwrap();
        assert!(error.contains("cannot read sslrootcert /nonexistent/ca.pem"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }
}
