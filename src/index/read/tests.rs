//! Tests of the reading half of `index`: parsing each manifest type and garbage, flattening
//! a buildx index, and telling our index from a foreign one.

use super::*;
use crate::index::{build_index, IndexFormat};
use rstest::rstest;
use std::collections::BTreeMap;

fn dg(c: char) -> String {
    format!("sha256:{}", c.to_string().repeat(64))
}

/// What `docker buildx build --platform linux/amd64,linux/arm64 --provenance=true` pushes.
fn buildx_index() -> String {
    let image = |d: char, arch: &str| {
        format!(
            r#"{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1000,"platform":{{"architecture":"{arch}","os":"linux"}}}}"#,
            dg(d)
        )
    };
    let attestation = |d: char, of: char| {
        format!(
            r#"{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":500,"platform":{{"architecture":"unknown","os":"unknown"}},"annotations":{{"{ANN_REF_DIGEST}":"{}","{ANN_REF_TYPE}":"{REF_TYPE_ATTESTATION}"}}}}"#,
            dg(d),
            dg(of)
        )
    };
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{},{},{},{}]}}"#,
        image('a', "amd64"),
        image('b', "arm64"),
        attestation('c', 'a'),
        attestation('d', 'b'),
    )
}

fn index(json: &str) -> ImageIndex {
    match parse_manifest(None, json.as_bytes()).unwrap() {
        Manifest::Index(i) => i,
        Manifest::Image(_) => panic!("not an index"),
    }
}

fn key(s: &str) -> PlatformKey {
    Platform::parse(s).unwrap().key()
}

#[test]
fn flatten_takes_the_platform_and_its_attestations() {
    let got = flatten(&index(&buildx_index()), &key("linux/arm64/v8")).unwrap();
    let got: Vec<_> = got
        .iter()
        .map(|(d, k)| (d.digest().to_string(), k.clone()))
        .collect();
    assert_eq!(
        got,
        [
            (dg('b'), EntryKind::Image),
            (dg('d'), EntryKind::Attestation { of: dg('b') })
        ]
    );
}

#[test]
fn flatten_names_the_missing_platform() {
    let err = flatten(&index(&buildx_index()), &key("linux/386")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no image for linux/386 in the index (it lists: linux/amd64, linux/arm64/v8)"
    );
}

#[test]
fn flatten_takes_a_lone_image_whatever_its_platform() {
    let mut idx = index(&buildx_index());
    let keep: Vec<_> = idx.manifests()[..1]
        .iter()
        .chain(&idx.manifests()[2..3])
        .cloned()
        .collect();
    idx.set_manifests(keep);
    let got = flatten(&idx, &key("linux/arm64/v8")).unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].0.digest().to_string(), dg('a'));
    assert_eq!(got[1].1, EntryKind::Attestation { of: dg('a') });
}

#[test]
fn a_buildx_index_is_foreign_and_kept_whole() {
    let TargetState::Foreign { entries } = read_target_index(&dg('f'), &index(&buildx_index()))
    else {
        panic!("should be foreign");
    };
    let got: Vec<_> = entries
        .iter()
        .map(|e| {
            (
                e.descriptor.digest().to_string(),
                e.platform.to_string(),
                e.kind.clone(),
                e.source.clone(),
            )
        })
        .collect();
    let from = EntrySource::Amended { from: dg('f') };
    assert_eq!(
        got,
        [
            (
                dg('a'),
                "linux/amd64".into(),
                EntryKind::Image,
                from.clone()
            ),
            (
                dg('b'),
                "linux/arm64".into(),
                EntryKind::Image,
                from.clone()
            ),
            (
                dg('c'),
                "unknown/unknown".into(),
                EntryKind::Attestation { of: dg('a') },
                from.clone()
            ),
            (
                dg('d'),
                "unknown/unknown".into(),
                EntryKind::Attestation { of: dg('b') },
                from
            ),
        ]
    );
}

#[test]
fn our_index_keeps_only_what_it_amended() {
    let TargetState::Foreign { mut entries } = read_target_index(&dg('f'), &index(&buildx_index()))
    else {
        panic!("should be foreign");
    };
    // arm64 is now pushed as an arch tag: its managed entry replaces the amended one.
    entries[1].source = EntrySource::Managed {
        arch_tag: "aarch64_v1".into(),
    };
    entries[3].source = entries[1].source.clone();
    let built = build_index(&entries, IndexFormat::Auto, &BTreeMap::new()).unwrap();
    let TargetState::Ours { amended } = read_target_index(
        &built.digest,
        &index(std::str::from_utf8(&built.bytes).unwrap()),
    ) else {
        panic!("should be ours");
    };
    let got: Vec<_> = amended
        .iter()
        .map(|e| {
            (
                e.descriptor.digest().to_string(),
                e.kind.clone(),
                e.source.clone(),
            )
        })
        .collect();
    let from = EntrySource::Amended { from: dg('f') };
    assert_eq!(
        got,
        [
            (dg('a'), EntryKind::Image, from.clone()),
            (dg('c'), EntryKind::Attestation { of: dg('a') }, from),
        ]
    );
}

const CONFIG: &str = r#""config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":7}"#;
const DOCKER_CONFIG_DESC: &str = r#""config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":7}"#;

#[rstest]
#[case(None, format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",{CONFIG},"layers":[]}}"#), OCI_MANIFEST)]
#[case(None, format!(r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}",{DOCKER_CONFIG_DESC},"layers":[]}}"#), DOCKER_MANIFEST)]
#[case(Some(OCI_MANIFEST), format!(r#"{{"schemaVersion":2,{CONFIG},"layers":[]}}"#), OCI_MANIFEST)]
#[case(Some("application/vnd.docker.distribution.manifest.v2+json; charset=utf-8"), format!(r#"{{"schemaVersion":2,{DOCKER_CONFIG_DESC}}}"#), DOCKER_MANIFEST)]
#[case(Some("application/json"), format!(r#"{{"schemaVersion":2,{CONFIG}}}"#), OCI_MANIFEST)]
#[case(None, format!(r#"{{"schemaVersion":2,{DOCKER_CONFIG_DESC}}}"#), DOCKER_MANIFEST)]
fn parses_images(
    #[case] content_type: Option<&str>,
    #[case] body: String,
    #[case] media_type: &str,
) {
    let got = parse_manifest(content_type, body.as_bytes()).unwrap();
    let Manifest::Image(info) = got else {
        panic!("not an image")
    };
    assert_eq!(info.media_type, media_type);
    assert_eq!(info.config_digest, format!("sha256:{}", "1".repeat(64)));
    assert!(info.config_media_type.ends_with("+json"));
}

#[rstest]
#[case(None, format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[]}}"#), OCI_INDEX)]
#[case(None, format!(r#"{{"schemaVersion":2,"mediaType":"{DOCKER_LIST}","manifests":[]}}"#), DOCKER_LIST)]
#[case(Some(DOCKER_LIST), r#"{"schemaVersion":2,"manifests":[]}"#.to_owned(), DOCKER_LIST)]
#[case(None, r#"{"schemaVersion":2,"manifests":[]}"#.to_owned(), OCI_INDEX)]
fn parses_indexes(
    #[case] content_type: Option<&str>,
    #[case] body: String,
    #[case] media_type: &str,
) {
    let Manifest::Index(i) = parse_manifest(content_type, body.as_bytes()).unwrap() else {
        panic!("not an index")
    };
    assert_eq!(
        i.media_type().as_ref().map(|m| m.to_string()).as_deref(),
        Some(media_type)
    );
}

#[test]
fn os_version_survives_parsing() {
    let body = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"platform":{{"architecture":"amd64","os":"windows","os.version":"10.0.17763.1","os.features":["win32k"]}}}}]}}"#,
        dg('a')
    );
    let entries = index_entries(&dg('f'), &index(&body));
    assert_eq!(
        entries[0].platform.os_version.as_deref(),
        Some("10.0.17763.1")
    );
    assert_eq!(entries[0].platform.os_features, ["win32k"]);
}

#[rstest]
#[case(None, "not json", "not JSON")]
#[case(None, "[]", "not a JSON object")]
#[case(None, "{}", "cannot tell")]
#[case(None, r#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#, "schema1")]
#[case(
    Some("application/vnd.docker.distribution.manifest.v1+prettyjws"),
    r#"{"name":"x"}"#,
    "schema1"
)]
#[case(
    None,
    r#"{"mediaType":"application/vnd.oci.artifact.manifest.v1+json"}"#,
    "unsupported"
)]
#[case(None, r#"{"mediaType":7}"#, "malformed manifest")]
#[case(
    None,
    r#"{"schemaVersion":2,"manifests":[{"mediaType":"x","digest":"sha256:zz","size":1}]}"#,
    "malformed image index"
)]
#[case(
    None,
    r#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"nope"}}"#,
    "malformed image manifest"
)]
#[case(
    None,
    r#"{"schemaVersion":2,"config":{"digest":"sha256:1"}}"#,
    "malformed image manifest"
)]
fn refuses_garbage(#[case] content_type: Option<&str>, #[case] body: &str, #[case] says: &str) {
    let err = parse_manifest(content_type, body.as_bytes())
        .unwrap_err()
        .to_string();
    assert!(err.contains(says), "{err}");
}

#[test]
fn config_platform_is_read_tolerantly() {
    let body = br#"{"architecture":"arm","os":"linux","variant":"v7","os.version":"","os.features":["a",3],"config":{"Env":[]},"rootfs":{}}"#;
    let got = parse_config_platform(body).unwrap();
    assert_eq!(
        got,
        ConfigPlatform {
            os: Some("linux".into()),
            architecture: Some("arm".into()),
            variant: Some("v7".into()),
            os_version: None,
            os_features: vec!["a".into()],
        }
    );
    assert_eq!(
        parse_config_platform(br#"{"os":5}"#).unwrap(),
        ConfigPlatform::default()
    );
    assert!(parse_config_platform(b"\x00").is_err());
}
