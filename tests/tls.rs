//! Issue 5, TLS: archmerge serving clients over TLS (rustls, HTTP/2 by
//! ALPN) and talking to an https registry it verifies.
//!
//! The certificates are made in the test (a throwaway CA and a server
//! certificate for 127.0.0.1, see `support::certs`). Clients verify them for
//! real: skopeo with `--dest-cert-dir`/`--cert-dir` holding only the test CA
//! and `--tls-verify=true`, and a hyper client whose only root is the test
//! CA and which offers only `h2` by ALPN.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use support::*;

/// `skopeo copy` of `layout` to `docker://<dest>` over verified TLS, trusting
/// only the CA in `cert_dir`. Returns the digest the registry stored.
fn skopeo_push_verified(layout: &OciLayout, dest: &str, cert_dir: &str) -> String {
    let digest_dir = tempfile::tempdir().unwrap();
    let digest_file = digest_dir.path().join("digest");
    let digest_arg = digest_file.display().to_string();
    skopeo(
        &[],
        &[
            "copy",
            "--retry-times",
            "0",
            "--dest-tls-verify=true",
            "--dest-cert-dir",
            cert_dir,
            "--digestfile",
            &digest_arg,
            &layout.reference(),
            &format!("docker://{dest}"),
        ],
    );
    std::fs::read_to_string(&digest_file)
        .expect("skopeo wrote no digest file")
        .trim()
        .to_owned()
}

/// `skopeo inspect --raw` over TLS trusting only `cert_dir`; no status check.
fn skopeo_inspect_verified(image: &str, cert_dir: &str) -> std::process::Output {
    skopeo_output(
        &[],
        &[
            "inspect",
            "--retry-times",
            "0",
            "--tls-verify=true",
            "--cert-dir",
            cert_dir,
            "--raw",
            &format!("docker://{image}"),
        ],
    )
}

/// GET `url` over TLS with `ca_der` as the only root and ALPN `h2` only:
/// (HTTP version, status, body).
async fn h2_get(url: &str, ca_der: &[u8], accept: &str) -> (http::Version, u16, Bytes) {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca_der.to_vec()))
        .expect("adding the test CA");
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http2()
        .build();
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let req = http::Request::get(url)
        .header("accept", accept)
        .body(Empty::new())
        .unwrap();
    let resp = client
        .request(req)
        .await
        .unwrap_or_else(|e| panic!("GET {url} over h2: {e:?}"));
    let version = resp.version();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (version, status, body)
}

#[tokio::test]
async fn skopeo_pushes_over_verified_tls_and_the_index_reads_back_over_https_and_h2() {
    let ca = TestCa::new();
    let registry = spawn_registry();
    let proxy = spawn_archmerge_tls(
        &registry.url(),
        ArchmergeOpts {
            args: vec![
                "--tls-cert".into(),
                ca.cert_pem().display().to_string(),
                "--tls-key".into(),
                ca.key_pem().display().to_string(),
            ],
            ..Default::default()
        },
    );
    let cert_dir = ca.cert_dir().display().to_string();
    let host = proxy.host();

    // Two CI jobs push their arch over verified TLS.
    let amd = build_oci_layout(&ImageSpec::new("linux", "amd64").layer(81, 2048), "v1");
    let arm = build_oci_layout(
        &ImageSpec::new("linux", "arm64")
            .variant("v8")
            .layer(82, 2048),
        "v1",
    );
    let amd_digest = skopeo_push_verified(&amd, &format!("{host}/tlsapp:x86_64_v1"), &cert_dir);
    let arm_digest = skopeo_push_verified(&arm, &format!("{host}/tlsapp:aarch64_v1"), &cert_dir);
    assert_eq!(amd_digest, amd.manifest_digest);
    assert_eq!(arm_digest, arm.manifest_digest);
    let want: BTreeSet<(String, String)> = [
        ("linux/amd64".to_owned(), amd_digest.clone()),
        ("linux/arm64/v8".to_owned(), arm_digest.clone()),
    ]
    .into();

    // The index, read back over https by skopeo trusting only the test CA.
    let out = skopeo_inspect_verified(&format!("{host}/tlsapp:v1"), &cert_dir);
    expect_success("skopeo inspect over TLS", &out);
    let index: Value = serde_json::from_slice(&out.stdout).expect("index is JSON");
    assert_eq!(index_entries(&index), want, "{index}");
    let stored = get_any_manifest(&http(), &registry.url(), "tlsapp", "v1")
        .await
        .expect(200);
    assert_eq!(
        out.stdout,
        stored.body.to_vec(),
        "over TLS the index bytes differ from the registry's"
    );

    // HTTP/2 by ALPN: the same bytes.
    let url = format!("{}/v2/tlsapp/manifests/v1", proxy.https_url());
    let (version, status, body) = h2_get(&url, &ca.ca_der, ACCEPT_ANY_MANIFEST).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(version, http::Version::HTTP_2, "ALPN h2 was not used");
    assert_eq!(body, stored.body);

    // Verification is real: without the CA, skopeo refuses archmerge's
    // certificate.
    let empty = tempfile::tempdir().unwrap();
    let out = skopeo_inspect_verified(
        &format!("{host}/tlsapp:v1"),
        &empty.path().display().to_string(),
    );
    assert!(
        !out.status.success(),
        "skopeo accepted a certificate of an unknown CA"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("certificate") || stderr.contains("x509"),
        "{stderr}"
    );
}

#[tokio::test]
async fn an_https_upstream_is_verified_against_upstream_ca_and_refused_without_it() {
    let ca = TestCa::new();
    let registry = spawn_registry_extra(
        &RegistryOpts::default(),
        &RegistryExtra {
            tls: Some((ca.cert_pem(), ca.key_pem())),
            ..Default::default()
        },
    );
    let upstream = registry.https_url();
    let cert_dir = ca.cert_dir().display().to_string();

    // With the CA: pushes over plain http to archmerge, over verified https
    // to the registry, merged.
    let trusting = spawn_archmerge_with(
        &upstream,
        ArchmergeOpts {
            args: vec!["--upstream-ca".into(), ca.ca_pem().display().to_string()],
            ..Default::default()
        },
    );
    let (status, body) = {
        let res = http()
            .get(format!("{}/readyz", trusting.admin_url()))
            .send()
            .await
            .unwrap();
        (res.status().as_u16(), res.text().await.unwrap_or_default())
    };
    assert_eq!(status, 200, "readyz with --upstream-ca: {body}");
    let c = http();
    let via = trusting.url();
    let amd = push_small_image(&c, &via, "secure", "x86_64_v1", "amd64", 91).await;
    let arm = push_small_image(&c, &via, "secure", "aarch64_v1", "arm64", 92).await;
    let want: BTreeSet<(String, String)> = [
        ("linux/amd64".to_owned(), amd.digest.clone()),
        ("linux/arm64/v8".to_owned(), arm.digest.clone()),
    ]
    .into();
    let through = get_any_manifest(&c, &via, "secure", "v1").await;
    assert_index_answer(&through);
    assert_eq!(through.entries(), want);
    // Straight from the https registry: the same index.
    let out = skopeo_inspect_verified(&format!("{}/secure:v1", registry.host()), &cert_dir);
    expect_success("skopeo inspect of the https registry", &out);
    assert_eq!(out.stdout, through.body.to_vec());

    // Without it: the registry's certificate is unknown, a 502 with an OCI
    // error body, and not ready.
    let doubting = spawn_archmerge(&upstream);
    let res = c
        .get(format!("{}/v2/", doubting.url()))
        .send()
        .await
        .unwrap();
    let body = expect_status(res, 502).await;
    oci_error_codes(&body);
    let res = c
        .get(format!("{}/readyz", doubting.admin_url()))
        .send()
        .await
        .unwrap();
    let ready = expect_status(res, 503).await;
    let said = format!(
        "{}\n{}",
        String::from_utf8_lossy(&ready),
        doubting.log_text()
    );
    assert!(
        said.to_lowercase().contains("certificate"),
        "nothing says the certificate was the problem:\n{said}"
    );
}
