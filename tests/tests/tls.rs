//! TLS on every listener: TLS 1.2 and 1.3 clients connect and call, a TLS 1.1 client is refused at
//! the handshake, and with a client CA set only clients holding a certificate it signed get in.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::{Arc, Mutex};

use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sightline_runtime::settings::TlsSettings;
use sightline_tests::{LinkerOptions, TestLinker};
use tokio::net::TcpStream;
use tonic::transport::Endpoint;

struct Pki {
    dir: tempfile::TempDir,
    ca_der: CertificateDer<'static>,
    client_cert: CertificateDer<'static>,
    client_key: Vec<u8>,
}

fn pki() -> Pki {
    let dir = tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client_cert = CertificateParams::new(vec!["companion.acme.example".to_owned()])
        .unwrap()
        .signed_by(&client_key, &issuer)
        .unwrap();

    std::fs::write(dir.path().join("server.pem"), server_cert.pem()).unwrap();
    std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
    Pki {
        ca_der: ca_cert.der().clone(),
        client_cert: client_cert.der().clone(),
        client_key: client_key.serialize_der(),
        dir,
    }
}

fn tls_settings(dir: &Path, require_client_cert: bool) -> TlsSettings {
    TlsSettings {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        client_ca: require_client_cert.then(|| dir.join("ca.pem")),
    }
}

/// Calls linker-svc over TLS limited to `versions`; returns the negotiated version.
async fn health_over_tls(
    linker: &TestLinker,
    pki: &Pki,
    versions: &[&'static rustls::SupportedProtocolVersion],
    with_client_cert: bool,
) -> Result<rustls::ProtocolVersion, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots);
    let mut config = if with_client_cert {
        builder
            .with_client_auth_cert(
                vec![pki.client_cert.clone()],
                PrivateKeyDer::try_from(pki.client_key.clone()).unwrap(),
            )
            .unwrap()
    } else {
        builder.with_no_client_auth()
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let negotiated = Arc::new(Mutex::new(None));
    let seen = negotiated.clone();
    let addr = linker.addr;
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            let seen = seen.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let tls = connector
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await?;
                *seen.lock().unwrap() = tls.get_ref().1.protocol_version();
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| format!("{e:?}"))?;
    service_answers(channel)
        .await
        .map_err(|e| format!("{e:?}"))?;
    let version = negotiated.lock().unwrap().ok_or("no version")?;
    Ok(version)
}

async fn service_answers(channel: tonic::transport::Channel) -> Result<(), tonic::Status> {
    let mut client =
        sightline_proto::linker::v1::linker_service_client::LinkerServiceClient::new(channel);
    // Any answer from the service proves the call crossed TLS: without a token it is UNAUTHENTICATED.
    let status = client
        .list_link_keys(sightline_proto::linker::v1::ListLinkKeysRequest::default())
        .await
        .unwrap_err();
    if status.code() == tonic::Code::Unauthenticated {
        Ok(())
    } else {
        Err(status)
    }
}

#[tokio::test]
async fn tls_1_2_and_1_3_clients_connect() {
    let pki = pki();
    let linker = TestLinker::start(LinkerOptions {
        tls: Some(tls_settings(pki.dir.path(), false)),
        ..Default::default()
    })
    .await;
    let v13 = health_over_tls(&linker, &pki, &[&rustls::version::TLS13], false)
        .await
        .unwrap();
    assert_eq!(v13, rustls::ProtocolVersion::TLSv1_3);
    let v12 = health_over_tls(&linker, &pki, &[&rustls::version::TLS12], false)
        .await
        .unwrap();
    assert_eq!(v12, rustls::ProtocolVersion::TLSv1_2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_1_1_client_is_refused_at_the_handshake() {
    let pki = pki();
    let linker = TestLinker::start(LinkerOptions {
        tls: Some(tls_settings(pki.dir.path(), false)),
        ..Default::default()
    })
    .await;
    // OpenSSL (through Python's ssl module) still speaks TLS 1.1 when asked to; rustls does not.
    let probe = r#"
import socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
ctx.minimum_version = getattr(ssl.TLSVersion, sys.argv[2])
ctx.maximum_version = getattr(ssl.TLSVersion, sys.argv[2])
host, port = sys.argv[1].rsplit(":", 1)
try:
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            print("CONNECTED", tls.version())
except ssl.SSLError as e:
    print("REFUSED", e.reason)
"#;
    let run = |version: &str| {
        let out = std::process::Command::new("python3")
            .args(["-c", probe, &linker.addr.to_string(), version])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let old = run("TLSv1_1");
    // The refusal is an alert from the server (rustls answers handshake_failure), not a client-side
    // "no protocols available".
    assert!(
        old.starts_with("REFUSED") && old.contains("ALERT"),
        "the server must refuse TLS 1.1 itself: {old}"
    );
    // The same probe gets through at TLS 1.2, so the refusal above is the server's doing.
    assert_eq!(run("TLSv1_2"), "CONNECTED TLSv1.2");
}

#[tokio::test]
async fn with_a_client_ca_only_certified_clients_get_in() {
    let pki = pki();
    let linker = TestLinker::start(LinkerOptions {
        tls: Some(tls_settings(pki.dir.path(), true)),
        ..Default::default()
    })
    .await;
    assert!(
        health_over_tls(&linker, &pki, &[&rustls::version::TLS13], true)
            .await
            .is_ok()
    );
    assert!(
        health_over_tls(&linker, &pki, &[&rustls::version::TLS13], false)
            .await
            .is_err()
    );
}
