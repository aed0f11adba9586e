//! Issues 4 and 7: a registry that wants credentials shows nobody an index
//! it would refuse them, in either mode.
//!
//! Each test starts `docker-registry` (CNCF distribution 2.8) with htpasswd
//! basic auth (`auth: htpasswd: {realm, path}`) and archmerge in front of
//! it, with no credentials of its own: whatever archmerge reads or writes,
//! it can only do with the client's. A CI job pushes arch tags with its
//! credentials; then an anonymous client and one with a wrong password ask
//! for the index every way a client can — GET and HEAD, by tag and by
//! digest, on a replica that served it a moment ago and on one that never
//! did — and must get the registry's 401 with its challenge, and neither the
//! index bytes nor its digest. Last, archmerge's log must hold no password
//! and no `Authorization` value.

mod support;

use std::collections::BTreeSet;

use reqwest::Method;
use rstest::rstest;

use support::*;

const OCI_MANIFEST: &str = media::OCI_MANIFEST;
const OCI_INDEX: &str = media::OCI_INDEX;

/// The CI job's credentials, the only user the registry knows.
fn ci() -> Creds {
    Creds::new("ci-builder", "Kx7-pass-4711-secret")
}

/// The same user with a wrong password.
fn wrong() -> Creds {
    ci().with_password("guessed-password-0000")
}

impl Stack {
    /// An htpasswd registry that knows only [`ci`], with archmerge in
    /// `mode` in front of it.
    fn htpasswd(mode: &str) -> Stack {
        let htpasswd = Htpasswd::new(&[&ci()]);
        let registry = RegistryOpts {
            htpasswd: Some(htpasswd.path()),
            ..RegistryOpts::default()
        };
        // The registry reads the file at start; kept for its lifetime.
        Stack::with_registry(registry, opts(mode)).keeping(htpasswd)
    }
}

/// `--mode <mode>`, with archmerge's own code logging everything it can, so
/// a credential that reaches any log line shows.
/// `serve-copying` is serve mode with zero-copy downloads off, so that its
/// authorization probes take the pooled client instead of archmerge's own
/// registry connections.
fn opts(mode: &str) -> ArchmergeOpts {
    let (mode, copying) = match mode {
        "serve-copying" => ("serve", true),
        other => (other, false),
    };
    ArchmergeOpts {
        args: vec!["--mode".into(), mode.into()],
        env: vec![("RUST_LOG".into(), "info,archmerge=trace".into())],
        config_toml: copying.then(|| "zero_copy_downloads = false\n".into()),
        ..ArchmergeOpts::default()
    }
}

/// Pushes `alias`'s image at `repo:<alias>_<target>` through `base` as the
/// CI job; returns (platform, digest).
async fn push_as_ci(
    base: &str,
    repo: &str,
    target: &str,
    alias: &str,
    seed: u64,
) -> (String, String) {
    let a = *EIGHT_ARCHES
        .iter()
        .find(|a| a.alias == alias)
        .unwrap_or_else(|| panic!("no arch {alias}"));
    let tag = format!("{alias}_{target}");
    let pushed = push_image(&http_as(Some(&ci())), base, repo, &tag, &a.image(seed)).await;
    (a.platform(), pushed.digest)
}

/// Asserts a refusal: 401, the registry's Basic challenge, no digest, no
/// ETag, and no index or child digest anywhere in the body.
fn assert_refused(a: &ManifestAnswer, secrets: &[&str]) {
    assert_eq!(a.status, 401, "{}: {}", a.asked, a.text());
    let challenge = a.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with("Basic") && challenge.contains("realm=\"archmerge-test\""),
        "{}: WWW-Authenticate {challenge:?}",
        a.asked
    );
    assert_eq!(a.digest_header(), None, "{}: a digest went out", a.asked);
    assert_eq!(a.header("etag"), None, "{}: an ETag went out", a.asked);
    for s in secrets {
        let hex = s.trim_start_matches("sha256:");
        assert!(
            !a.text().contains(hex),
            "{}: body names {s}: {}",
            a.asked,
            a.text()
        );
    }
    assert!(!a.text().contains("manifests"), "{}: {}", a.asked, a.text());
}

/// Asserts that `log` holds neither password nor either Basic token, and
/// that it did log the refused requests (so the check is not vacuous).
fn assert_no_credentials_in(log: &str, what: &str) {
    assert!(
        log.contains("status=401"),
        "{what}: the refusals were not logged at all:\n{log}"
    );
    for c in [ci(), wrong()] {
        for secret in [c.password.clone(), c.basic_token()] {
            let at = log.find(&secret);
            assert!(
                at.is_none(),
                "{what}: a credential reached the log: {}",
                log[at.unwrap().saturating_sub(200)..]
                    .lines()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
}

// === reading ===

#[rstest]
#[case::write_mode("write")]
#[case::serve_mode("serve")]
#[case::serve_mode_copying("serve-copying")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_and_wrong_password_clients_get_401_and_neither_index_nor_digest(
    #[case] mode: &'static str,
) {
    let s = Stack::htpasswd(mode);
    let repo = "private/app";
    let mut want = BTreeSet::new();
    want.insert(push_as_ci(&s.proxy.url(), repo, "v1", "x86_64", 1).await);
    want.insert(push_as_ci(&s.proxy.url(), repo, "v1", "aarch64", 2).await);

    // The CI job reads its index through archmerge, GET and HEAD, by tag
    // and by digest.
    let owner = http_as(Some(&ci()));
    let index = get_any_manifest(&owner, &s.proxy.url(), repo, "v1").await;
    assert_index_answer(&index);
    assert_eq!(index.entries(), want, "{}", index.text());
    let digest = index.digest_header().unwrap();
    for reference in ["v1", digest.as_str()] {
        let head = ask_manifest(
            &owner,
            Method::HEAD,
            &s.proxy.url(),
            repo,
            reference,
            &[ACCEPT_ANY_MANIFEST],
        )
        .await
        .expect(200);
        assert_eq!(head.digest_header().as_deref(), Some(digest.as_str()));
        assert_eq!(head.content_length(), Some(index.body.len() as u64));
        let by = get_any_manifest(&owner, &s.proxy.url(), repo, reference).await;
        assert!(by.body == index.body, "{reference}");
    }
    // Write mode stored it (with the CI job's own credentials: archmerge
    // has none); serve mode stored nothing.
    let direct = get_any_manifest(&owner, &s.registry.url(), repo, "v1").await;
    match mode {
        "write" => assert!(direct.expect(200).body == index.body),
        _ => {
            direct.expect(404);
        }
    }

    // Nobody else learns anything: not the bytes, not the digest, not even
    // which children it lists; on the replica that just served it (warm
    // caches) and on one that never did.
    let fresh = s.replica(opts(mode));
    let mut secrets: Vec<&str> = vec![digest.as_str()];
    secrets.extend(want.iter().map(|(_, d)| d.as_str()));
    let anonymous = http_as(None);
    let guesser = http_as(Some(&wrong()));
    for base in [s.proxy.url(), fresh.url()] {
        for client in [&anonymous, &guesser] {
            for reference in ["v1", digest.as_str()] {
                for method in [Method::GET, Method::HEAD] {
                    for accept in [ACCEPT_ANY_MANIFEST, "*/*", OCI_INDEX] {
                        let a =
                            ask_manifest(client, method.clone(), &base, repo, reference, &[accept])
                                .await;
                        assert_refused(&a, &secrets);
                    }
                }
            }
        }
    }
    // The owner still gets it from the fresh replica afterwards.
    let again = get_any_manifest(&owner, &fresh.url(), repo, "v1").await;
    assert!(again.body == index.body);

    assert_no_credentials_in(&strip_ansi(&s.proxy.log_text()), "archmerge");
    assert_no_credentials_in(&strip_ansi(&fresh.log_text()), "the fresh replica");
}

#[rstest]
#[case::write_mode("write")]
#[case::serve_mode("serve")]
#[tokio::test]
async fn content_negotiation_does_not_answer_before_the_registry_authorizes(
    #[case] mode: &'static str,
) {
    // A client that accepts no index type would be told 404 "the manifest is
    // an OCI index" — which says that there is an index, and what kind. The
    // registry refuses an unauthenticated client before it looks at Accept;
    // so must archmerge.
    let s = Stack::htpasswd(mode);
    let repo = "private/negotiate";
    let (_, child) = push_as_ci(&s.proxy.url(), repo, "v2", "x86_64", 3).await;
    let owner = http_as(Some(&ci()));
    let index = get_any_manifest(&owner, &s.proxy.url(), repo, "v2").await;
    assert_index_answer(&index);
    let digest = index.digest_header().unwrap();
    let secrets = [digest.as_str(), child.as_str()];
    for client in [http_as(None), http_as(Some(&wrong()))] {
        for reference in ["v2", digest.as_str()] {
            for method in [Method::GET, Method::HEAD] {
                let a = ask_manifest(
                    &client,
                    method,
                    &s.proxy.url(),
                    repo,
                    reference,
                    &[OCI_MANIFEST],
                )
                .await;
                assert_refused(&a, &secrets);
            }
        }
    }
}

// === pushing ===

#[rstest]
#[case::write_mode("write")]
#[case::serve_mode("serve")]
#[tokio::test]
async fn only_a_push_with_credentials_merges_and_the_challenge_passes_through(
    #[case] mode: &'static str,
) {
    let s = Stack::htpasswd(mode);
    let repo = "private/push";
    let owner = http_as(Some(&ci()));

    // The registry's challenge reaches the client as the registry sent it.
    for path in ["/v2/", &format!("/v2/{repo}/blobs/uploads/")] {
        let method = if path == "/v2/" {
            Method::GET
        } else {
            Method::POST
        };
        let via = http_as(None)
            .request(method.clone(), format!("{}{path}", s.proxy.url()))
            .send()
            .await
            .unwrap();
        let direct = http_as(None)
            .request(method.clone(), format!("{}{path}", s.registry.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(via.status(), 401, "{method} {path}");
        assert_eq!(
            header(&via, "www-authenticate"),
            header(&direct, "www-authenticate"),
            "{method} {path}"
        );
        assert!(header(&via, "www-authenticate").is_some());
    }

    // The CI job uploads the blobs; then an anonymous client and one with a
    // wrong password try to tag the manifest as an arch tag.
    let image = EIGHT_ARCHES[0].image(4);
    let built = build_oci_layout(&image, "x86_64_v3");
    for d in built.blob_digests() {
        put_blob(
            &owner,
            &s.proxy.url(),
            repo,
            &std::fs::read(built.blob_path(&d)).unwrap(),
        )
        .await;
    }
    for client in [http_as(None), http_as(Some(&wrong()))] {
        let res = put_manifest(
            &client,
            &s.proxy.url(),
            repo,
            "x86_64_v3",
            OCI_MANIFEST,
            &built.manifest,
        )
        .await;
        assert_eq!(res.status(), 401);
        assert!(header(&res, "www-authenticate").is_some());
    }
    assert_eq!(
        list_tags(&owner, &s.registry.url(), repo).await,
        Vec::<String>::new()
    );
    get_any_manifest(&owner, &s.proxy.url(), repo, "v3")
        .await
        .expect(404);

    // With credentials the push lands and merges — in write mode written by
    // archmerge with the CI job's own credentials, the only ones it has.
    let res = put_manifest(
        &owner,
        &s.proxy.url(),
        repo,
        "x86_64_v3",
        OCI_MANIFEST,
        &built.manifest,
    )
    .await;
    assert_eq!(res.status(), 201);
    let index = get_any_manifest(&owner, &s.proxy.url(), repo, "v3").await;
    assert_index_answer(&index);
    assert_eq!(
        index.entries(),
        BTreeSet::from([("linux/amd64".to_owned(), built.manifest_digest.clone())])
    );
    let tags = list_tags(&owner, &s.registry.url(), repo).await;
    match mode {
        "write" => assert_eq!(tags, ["v3", "x86_64_v3"]),
        _ => assert_eq!(tags, ["x86_64_v3"]),
    }
    assert_no_credentials_in(&strip_ansi(&s.proxy.log_text()), "archmerge");
}
