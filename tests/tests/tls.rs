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
    let dir = sightline_runtime::testing::private_tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
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
        ca: Some(dir.join("ca.pem")),
    }
}

/// A channel to `addr` over TLS limited to `versions`, and the version the handshake settles on.
async fn tls_channel(
    addr: std::net::SocketAddr,
    pki: &Pki,
    versions: &[&'static rustls::SupportedProtocolVersion],
    with_client_cert: bool,
) -> Result<(tonic::transport::Channel, rustls::ProtocolVersion), String> {
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
    let version = negotiated.lock().unwrap().ok_or("no version")?;
    Ok((channel, version))
}

/// Calls linker-svc over TLS limited to `versions`; returns the negotiated version.
async fn health_over_tls(
    linker: &TestLinker,
    pki: &Pki,
    versions: &[&'static rustls::SupportedProtocolVersion],
    with_client_cert: bool,
) -> Result<rustls::ProtocolVersion, String> {
    let (channel, version) = tls_channel(linker.addr, pki, versions, with_client_cert).await?;
    service_answers(channel)
        .await
        .map_err(|e| format!("{e:?}"))?;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_on_consent_calls_linker_over_mtls_and_clients_change_consent_over_tls_1_2_and_1_3()
 {
    use sightline_proto::common::v1::{SharingLevel, UsageLevel};
    use sightline_proto::consent::v1 as consent_pb;
    use sightline_tests::authed;

    let pki = pki();
    // Both services require client certificates (mTLS) and trust the stack's CA.
    let tls = tls_settings(pki.dir.path(), true);
    let linker = TestLinker::start(LinkerOptions {
        tls: Some(tls.clone()),
        ..Default::default()
    })
    .await;
    let consent = sightline_tests::TestConsent::start_tls(&linker, tls).await;
    let (to_linker, _) = tls_channel(linker.addr, &pki, &[&rustls::version::TLS13], true)
        .await
        .unwrap();
    let org = sightline_tests::admin::org(to_linker, linker.operator.expose(), "Acme").await;
    let (org_id, admin) = (org.id, org.admin);
    for (version, want, usage) in [
        (
            &rustls::version::TLS12,
            rustls::ProtocolVersion::TLSv1_2,
            UsageLevel::Basic,
        ),
        (
            &rustls::version::TLS13,
            rustls::ProtocolVersion::TLSv1_3,
            UsageLevel::Advanced,
        ),
    ] {
        let (to_consent, negotiated) = tls_channel(consent.addr, &pki, &[version], true)
            .await
            .unwrap();
        assert_eq!(negotiated, want);
        // The change needs consent-svc to validate the token and write the audit entry in
        // linker-svc, both over mTLS.
        let changed = consent_pb::consent_service_client::ConsentServiceClient::new(to_consent)
            .update_consent(authed(
                &admin,
                consent_pb::UpdateConsentRequest {
                    org_id: org_id.clone(),
                    settings: Some(consent_pb::ConsentSettings {
                        usage_level: usage as i32,
                        sharing_level: SharingLevel::Basic as i32,
                        ..Default::default()
                    }),
                    reason: format!("over {want:?}"),
                    expected_version: 0,
                    request_id: String::new(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .consent
            .unwrap();
        assert_eq!(changed.settings.unwrap().usage_level(), usage);
    }
    // Without a client certificate consent-svc lets nobody in either.
    let refused = match tls_channel(consent.addr, &pki, &[&rustls::version::TLS13], false).await {
        Err(_) => true,
        Ok((channel, _)) => consent_pb::consent_service_client::ConsentServiceClient::new(channel)
            .get_receipt_key(consent_pb::GetReceiptKeyRequest {})
            .await
            .is_err_and(|s| s.code() != tonic::Code::Unauthenticated),
    };
    assert!(refused, "a client without a certificate got through");
}
