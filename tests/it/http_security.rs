//! HTTP access control and hardening, against the real binary: basic
//! authentication and TLS from `--web.config.file`, refusal of bad web
//! configurations, methods, request limits and an HTTP slowloris.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{http_request, spawn, wait_until, Exporter};
use base64::Engine as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

type Reply = (u16, HashMap<String, String>, Vec<u8>);

/// A bcrypt hash of `password` at cost 4 (fast in a debug build) with the
/// given prefix version.
fn bcrypt_hash(password: &str, version: bcrypt::Version) -> String {
    bcrypt::hash_with_result(password, 4).expect("bcrypt").format_for_version(version)
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

/// Writes `web.yml` into `dir` and returns its path as a string.
fn write_config(dir: &Path, yaml: &str) -> String {
    let path = dir.join("web.yml");
    std::fs::write(&path, yaml).expect("write web.yml");
    path.to_str().expect("utf-8 path").to_owned()
}

/// Parses a raw HTTP/1.1 response (no chunked bodies needed here).
fn parse_reply(raw: &[u8]) -> Option<Reply> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some((status, headers, raw[split + 4..].to_vec()))
}

/// Reads until EOF, a reset or the timeout; returns what arrived.
fn read_all(s: &mut impl Read) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return out,
        }
    }
}

/// Sends raw bytes and returns the parsed response, or `None` when the
/// server closed without one.
fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Option<Reply> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    // The server may answer and close before it has read everything.
    let _ = s.write_all(bytes);
    parse_reply(&read_all(&mut s))
}

/// Waits for the process to exit by itself and returns its stderr.
fn wait_for_failed_start(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, log) = spawn(dir.path(), extra);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the exporter did not stop on a bad web config; log:\n{}", log.lock().unwrap().join("\n"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "a bad web config must fail the start");
    // Let the stderr reader drain.
    wait_until("stderr to close", Duration::from_secs(5), || !log.lock().unwrap().is_empty());
    std::thread::sleep(Duration::from_millis(50));
    let text = log.lock().unwrap().join("\n");
    assert!(!text.contains("http server listening"), "nothing may be served: {text}");
    text
}

#[test]
fn basic_auth_guards_everything_but_liveness() {
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = format!(
        "basic_auth_users:\n  prometheus: {}\n  grafana: '{}'\n  ops: \"{}\"\n",
        bcrypt_hash("s3cret", bcrypt::Version::TwoY),
        bcrypt_hash("other", bcrypt::Version::TwoB),
        bcrypt_hash("third", bcrypt::Version::TwoA),
    );
    let config = write_config(dir.path(), &yaml);
    let e = Exporter::start(&["--web.config.file", &config]);
    assert!(e.log_text().contains("basic_auth=true"), "{}", e.log_text());
    let good = basic("prometheus", "s3cret");

    for path in ["/metrics", "/", "/health", "/health/ready", "/api/bots", "/api/usage", "/nope"] {
        let (status, headers, _) = e.get(path);
        assert_eq!(status, 401, "{path} without credentials");
        assert_eq!(
            headers.get("www-authenticate").map(String::as_str),
            Some(r#"Basic realm="kissbot-exporter", charset="UTF-8""#),
            "{path}"
        );
    }
    for auth in [
        basic("prometheus", "wrong"),
        basic("prometheus", ""),
        basic("nobody", "s3cret"),
        basic("grafana", "s3cret"),
        "Basic not-base64!".to_owned(),
        "Bearer abc".to_owned(),
        basic("prometheus", "s3cret").to_lowercase(),
    ] {
        assert_eq!(e.request("GET", "/metrics", &[("Authorization", &auth)]).0, 401, "{auth}");
    }

    let (status, _, body) = e.request("GET", "/metrics", &[("Authorization", &good)]);
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("kissbot_"), "metrics served");
    // Repeated scrapes hit the verification cache and stay correct.
    for _ in 0..5 {
        assert_eq!(e.request("GET", "/metrics", &[("Authorization", &good)]).0, 200);
    }
    assert_eq!(e.request("GET", "/api/bots", &[("Authorization", &good)]).0, 200);
    assert_eq!(e.request("GET", "/", &[("Authorization", &basic("grafana", "other"))]).0, 200);
    assert_eq!(e.request("GET", "/", &[("Authorization", &basic("ops", "third"))]).0, 200);
    // The wrong password still fails after the right one was cached.
    assert_eq!(e.request("GET", "/metrics", &[("Authorization", &basic("prometheus", "wrong"))]).0, 401);

    // Liveness probes stay open: a kubelet has no credentials.
    assert_eq!(e.get("/healthz").0, 200);
    assert_eq!(e.get("/health/live").0, 200);
    assert_eq!(e.request("HEAD", "/healthz", &[]).0, 200);

    // The lifecycle endpoint needs credentials too.
    assert_eq!(e.request("POST", "/-/reload", &[]).0, 401);
    assert_eq!(e.request("POST", "/-/reload", &[("Authorization", &good)]).0, 403, "lifecycle is off by default");
    // Methods are checked after authentication.
    assert_eq!(e.request("PUT", "/metrics", &[]).0, 401);
    assert_eq!(e.request("PUT", "/metrics", &[("Authorization", &good)]).0, 405);
}

#[test]
fn methods_other_than_get_and_head_get_405() {
    let e = Exporter::start(&[]);
    for method in ["PUT", "DELETE", "POST", "PATCH", "OPTIONS"] {
        for path in ["/metrics", "/", "/api/bots"] {
            let (status, headers, _) = e.request(method, path, &[]);
            assert_eq!(status, 405, "{method} {path}");
            assert_eq!(headers.get("allow").map(String::as_str), Some("GET, HEAD"), "{method} {path}");
        }
    }
    let (status, headers, _) = e.request("DELETE", "/-/reload", &[]);
    assert_eq!((status, headers.get("allow").map(String::as_str)), (405, Some("POST")));
    let (status, headers, body) = e.request("HEAD", "/metrics", &[]);
    assert_eq!(status, 200);
    assert!(body.is_empty(), "HEAD has no body");
    assert!(headers.contains_key("content-type"));
}

#[test]
fn oversized_requests_are_refused_and_the_server_keeps_serving() {
    let e = Exporter::start(&[]);

    // A 100 KiB header field: 431, or the connection closed.
    let big = format!("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(100 * 1024));
    if let Some((status, _, _)) = raw_exchange(e.addr, big.as_bytes()) {
        assert_eq!(status, 431);
    }
    // Too many header fields.
    let mut many = String::from("GET /metrics HTTP/1.1\r\nHost: x\r\n");
    for i in 0..200 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    if let Some((status, _, _)) = raw_exchange(e.addr, many.as_bytes()) {
        assert_eq!(status, 431);
    }
    // A body on a GET, announced or chunked: 413 without reading it, and
    // the connection is not kept.
    let (status, headers, _) =
        raw_exchange(e.addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n").expect("a reply");
    assert_eq!(status, 413);
    assert_eq!(headers.get("connection").map(String::as_str), Some("close"));
    let (status, _, _) =
        raw_exchange(e.addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            .expect("a reply");
    assert_eq!(status, 413);
    // A small body is tolerated.
    let (status, _, _) =
        raw_exchange(e.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi")
            .expect("a reply");
    assert_eq!(status, 200);

    assert_eq!(e.get("/metrics").0, 200, "still serving");
}

#[test]
fn a_silent_connection_is_closed_by_the_header_timeout() {
    let e = Exporter::start(&[]);
    let mut s = TcpStream::connect(e.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"GET /metr").unwrap();
    let started = Instant::now();
    let _ = read_all(&mut s);
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(20), "closed after {waited:?}");
    assert!(waited >= Duration::from_secs(5), "closed too early, after {waited:?}");
}

#[test]
fn slowloris_does_not_starve_a_scrape() {
    let e = Exporter::start(&[]);
    // More half-open requests than the connection limit (256), held open.
    let mut loris = Vec::new();
    for _ in 0..300 {
        let mut s = TcpStream::connect(e.addr).expect("connect");
        s.write_all(b"GET /metr").expect("partial request line");
        loris.push(s);
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(5);
    let status = loop {
        let attempt = (|| {
            let mut s = TcpStream::connect(e.addr).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
            parse_reply(&read_all(&mut s)).map(|r| r.0)
        })();
        if let Some(status) = attempt {
            break status;
        }
        assert!(Instant::now() < deadline, "no scrape answered within 5 s while 300 slow connections were open");
    };
    assert_eq!(status, 200);
    assert!(started.elapsed() < Duration::from_secs(5));
    // The limit was hit, and said so.
    wait_until("the connection limit log line", Duration::from_secs(5), || {
        e.log_text().contains("http connection limit reached")
    });
    // A keep-alive scraper that is mid-request is never the one evicted:
    // the oldest half-open requests go first.
    drop(loris);
    assert_eq!(e.get("/metrics").0, 200);
}

#[test]
fn bad_web_configs_stop_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: Vec<(String, &str)> = vec![
        ("basic_auth_user:\n  prometheus: x\n".into(), "unknown field `basic_auth_user`"),
        ("basic_auth_users:\n  prometheus: s3cret\n".into(), "basic_auth_users.prometheus: not a bcrypt hash"),
        ("basic_auth_users:\n  prometheus: $2y$10$tooshort\n".into(), "not a valid bcrypt hash"),
        ("tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n".into(), "cannot read cert_file"),
        ("tls_server_config:\n  cert_file: x.crt\n  keyfile: x.key\n".into(), "unknown field `keyfile`"),
        ("tls_server_config:\n  key_file: x.key\n".into(), "cert_file is required"),
        ("basic_auth_users: [a, b]\n".into(), "basic_auth_users"),
        ("tls_server_config: {\n".into(), "web config"),
    ];
    for (yaml, expected) in &cases {
        let config = write_config(dir.path(), yaml);
        let log = wait_for_failed_start(&["--web.config.file", &config]);
        assert!(log.contains("--web.config.file"), "the flag is named for {yaml:?}: {log}");
        assert!(log.contains(expected), "{yaml:?} should fail with {expected:?}: {log}");
    }
    let missing = dir.path().join("absent.yml");
    let log = wait_for_failed_start(&["--web.config.file", missing.to_str().unwrap()]);
    assert!(log.contains("cannot read the file"), "{log}");
}

/// A self-signed certificate for localhost and 127.0.0.1, as PEM.
fn self_signed() -> (String, String, CertificateDer<'static>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("generate certificate");
    (ck.cert.pem(), ck.signing_key.serialize_pem(), ck.cert.der().clone())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(
    trust: &CertificateDer<'static>,
    versions: &[&'static rustls::SupportedProtocolVersion],
    client_cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.clone()).expect("trust the test certificate");
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots);
    Arc::new(match client_cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).expect("client cert"),
        None => builder.with_no_client_auth(),
    })
}

/// One HTTPS request; `Err` when the handshake or the exchange fails.
fn https_get(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    let name = ServerName::try_from("localhost").expect("server name");
    let conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    let sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(15))).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    tls.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            // A peer that closes without close_notify, once the reply is in.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof && !raw.is_empty() => break,
            Err(e) => return Err(e.to_string()),
        }
    }
    parse_reply(&raw).ok_or_else(|| format!("no http reply in {} bytes", raw.len()))
}

#[test]
fn tls_serves_https_and_refuses_plain_http() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_pem, key_pem, der) = self_signed();
    // Relative paths start at the config file's directory.
    let conf = dir.path().join("conf");
    std::fs::create_dir(&conf).unwrap();
    std::fs::write(conf.join("server.crt"), cert_pem).unwrap();
    std::fs::write(conf.join("server.key"), key_pem).unwrap();
    let hash = bcrypt_hash("s3cret", bcrypt::Version::TwoY);
    let config = write_config(
        &conf,
        &format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  min_version: TLS12\n\
             http_server_config:\n  headers:\n    Strict-Transport-Security: max-age=31536000\n\
             basic_auth_users:\n  prometheus: {hash}\n"
        ),
    );
    let e = Exporter::start(&["--web.config.file", &config]);
    assert!(e.log_text().contains("tls=true"), "{}", e.log_text());

    let both = client_config(&der, &[&rustls::version::TLS13, &rustls::version::TLS12], None);
    let auth = basic("prometheus", "s3cret");
    let (status, headers, body) =
        https_get(e.addr, both.clone(), "/metrics", &[("Authorization", &auth)]).expect("https scrape");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("kissbot_"));
    assert_eq!(headers.get("strict-transport-security").map(String::as_str), Some("max-age=31536000"));
    let (status, _, _) = https_get(e.addr, both.clone(), "/metrics", &[]).expect("https without credentials");
    assert_eq!(status, 401);
    let (status, _, _) = https_get(e.addr, both, "/healthz", &[]).expect("https liveness");
    assert_eq!(status, 200);
    let tls12 = client_config(&der, &[&rustls::version::TLS12], None);
    assert_eq!(https_get(e.addr, tls12, "/healthz", &[]).expect("TLS 1.2").0, 200);

    // Plain HTTP to the TLS port gets no HTTP response.
    let mut s = TcpStream::connect(e.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let raw = read_all(&mut s);
    assert!(!raw.starts_with(b"HTTP/"), "plain http must not be served: {:?}", String::from_utf8_lossy(&raw));

    // A client that does not trust the certificate fails.
    let (_, _, other) = self_signed();
    assert!(https_get(e.addr, client_config(&other, &[&rustls::version::TLS13], None), "/healthz", &[]).is_err());
    // Still serving after all that.
    let both = client_config(&der, &[&rustls::version::TLS13], None);
    assert_eq!(https_get(e.addr, both, "/healthz", &[]).expect("https").0, 200);
}

#[test]
fn tls13_only_refuses_tls12_clients() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_pem, key_pem, der) = self_signed();
    std::fs::write(dir.path().join("server.crt"), cert_pem).unwrap();
    std::fs::write(dir.path().join("server.key"), key_pem).unwrap();
    let config = write_config(
        dir.path(),
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  min_version: TLS13\n",
    );
    let e = Exporter::start(&["--web.config.file", &config]);
    let tls12 = client_config(&der, &[&rustls::version::TLS12], None);
    assert!(https_get(e.addr, tls12, "/healthz", &[]).is_err(), "TLS 1.2 refused");
    let tls13 = client_config(&der, &[&rustls::version::TLS13], None);
    assert_eq!(https_get(e.addr, tls13, "/healthz", &[]).expect("TLS 1.3").0, 200);
}

#[test]
fn mutual_tls_requires_a_verified_client_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_pem, key_pem, der) = self_signed();
    // A client CA and a client certificate it signed.
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "test client ca");
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let client_key = rcgen::KeyPair::generate().expect("client key");
    let mut client_params = rcgen::CertificateParams::new(vec!["prometheus".to_owned()]).expect("client params");
    client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client_params.signed_by(&client_key, &issuer).expect("client cert");

    std::fs::write(dir.path().join("server.crt"), cert_pem).unwrap();
    std::fs::write(dir.path().join("server.key"), key_pem).unwrap();
    std::fs::write(dir.path().join("clients.crt"), ca_cert.pem()).unwrap();
    let config = write_config(
        dir.path(),
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_ca_file: clients.crt\n  \
         client_auth_type: RequireAndVerifyClientCert\n",
    );
    let e = Exporter::start(&["--web.config.file", &config]);

    let anonymous = client_config(&der, &[&rustls::version::TLS13], None);
    assert!(https_get(e.addr, anonymous, "/metrics", &[]).is_err(), "no client certificate, no answer");
    let key = PrivateKeyDer::try_from(client_key.serialize_der()).expect("client key der");
    let with_cert = client_config(&der, &[&rustls::version::TLS13], Some((vec![client_cert.der().clone()], key)));
    assert_eq!(https_get(e.addr, with_cert, "/metrics", &[]).expect("mutual tls").0, 200);

    // A client certificate from another CA is refused.
    let (_, stranger_key_pem, stranger_der) = self_signed();
    let stranger_key =
        PrivateKeyDer::try_from(rcgen::KeyPair::from_pem(&stranger_key_pem).expect("stranger key").serialize_der())
            .expect("stranger key der");
    let stranger = client_config(&der, &[&rustls::version::TLS13], Some((vec![stranger_der], stranger_key)));
    assert!(https_get(e.addr, stranger, "/metrics", &[]).is_err(), "unknown client CA refused");

    // Client CAs without a client auth policy are a configuration error.
    let bad = write_config(
        dir.path(),
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_ca_file: clients.crt\n",
    );
    let log = wait_for_failed_start(&["--web.config.file", &bad]);
    assert!(log.contains("client_ca_file is set but client_auth_type is not"), "{log}");
}

#[test]
fn plain_http_defaults_still_work() {
    let e = Exporter::start(&[]);
    assert!(e.log_text().contains("tls=false basic_auth=false"), "{}", e.log_text());
    let (status, _, _) = http_request(e.addr, "GET", "/metrics", &[]);
    assert_eq!(status, 200);
}

/// A FIFO named as the web configuration, or as its certificate, is refused
/// at once instead of hanging the start (and `--check-config`) forever.
#[test]
fn a_web_config_or_certificate_that_is_a_fifo_is_refused_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("web.yml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let key = dir.path().join("cert.pem");
    let c = std::ffi::CString::new(key.to_str().unwrap()).unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let tls = dir.path().join("tls.yml");
    std::fs::write(&tls, "tls_server_config:\n  cert_file: cert.pem\n  key_file: cert.pem\n").unwrap();
    for config in [&fifo, &tls] {
        let mut child = std::process::Command::new(crate::common::binary())
            .arg("--check-config")
            .arg(format!("--web.config.file={}", config.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("--check-config with {} hung", config.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert!(!status.success(), "{}", config.display());
        assert!(err.contains("not a regular file"), "{}: {err}", config.display());
    }
}
