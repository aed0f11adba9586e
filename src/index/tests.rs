//! Tests of `build_index`: golden bytes, order independence, one entry per platform, media
//! type choice, idempotence. Reading-side tests live in `read.rs` and `decide.rs`.

use std::collections::BTreeMap;
use std::str::FromStr;

use oci_spec::image::{Descriptor, Digest, MediaType};
use proptest::prelude::*;

use super::*;
use crate::platform::Platform;

/// `sha256:` and 64 times `c`.
fn dg(c: char) -> String {
    format!("sha256:{}", c.to_string().repeat(64))
}

fn desc(media_type: &str, digest: char, size: u64) -> Descriptor {
    Descriptor::new(
        MediaType::from(media_type),
        size,
        Digest::from_str(&dg(digest)).unwrap(),
    )
}

fn image(digest: char, platform: &str, arch_tag: &str) -> Entry {
    Entry {
        descriptor: desc(OCI_MANIFEST, digest, 1000),
        platform: Platform::parse(platform).unwrap(),
        kind: EntryKind::Image,
        source: EntrySource::Managed {
            arch_tag: arch_tag.into(),
        },
    }
}

fn amended(digest: char, platform: &str, from: char) -> Entry {
    Entry {
        source: EntrySource::Amended { from: dg(from) },
        ..image(digest, platform, "")
    }
}

fn attestation(digest: char, of: char, source: EntrySource) -> Entry {
    let mut d = desc(OCI_MANIFEST, digest, 500);
    d.set_platform(Some(Platform::new("unknown", "unknown", None).to_oci()));
    d.set_annotations(Some(
        [
            (ANN_REF_TYPE.to_owned(), REF_TYPE_ATTESTATION.to_owned()),
            (ANN_REF_DIGEST.to_owned(), dg(of)),
        ]
        .into(),
    ));
    Entry {
        descriptor: d,
        platform: Platform::new("unknown", "unknown", None),
        kind: EntryKind::Attestation { of: dg(of) },
        source,
    }
}

fn managed(tag: &str) -> EntrySource {
    EntrySource::Managed {
        arch_tag: tag.into(),
    }
}

/// Two managed images (given in the "wrong" order and spelling), an attestation, and a
/// Windows image amended from a foreign index.
fn fixture() -> Vec<Entry> {
    let mut windows = amended('d', "windows/amd64", 'e');
    windows.platform.os_version = Some("10.0.20348.1".into());
    windows.descriptor.set_size(1002);
    let mut arm = image('b', "linux/aarch64", "aarch64_v1");
    arm.descriptor.set_size(1001);
    vec![
        attestation('c', 'b', managed("aarch64_v1")),
        windows,
        arm,
        image('a', "linux/x86_64", "x86_64_v1"),
    ]
}

fn build(entries: &[Entry]) -> BuiltIndex {
    build_index(entries, IndexFormat::Auto, &BTreeMap::new()).unwrap()
}

fn digests(built: &BuiltIndex) -> Vec<String> {
    match parse_manifest(None, &built.bytes).unwrap() {
        Manifest::Index(i) => i
            .manifests()
            .iter()
            .map(|d| d.digest().to_string())
            .collect(),
        Manifest::Image(_) => panic!("not an index"),
    }
}

#[test]
fn golden_bytes() {
    let annotations = BTreeMap::from([(
        "org.opencontainers.image.created".to_owned(),
        "2024-01-01T00:00:00Z".to_owned(),
    )]);
    let built = build_index(&fixture(), IndexFormat::Auto, &annotations).unwrap();
    let want = concat!(
        r#"{"annotations":{"org.opencontainers.image.created":"2024-01-01T00:00:00Z"},"manifests":["#,
        r#"{"annotations":{"io.archmerge.tag":"x86_64_v1"},"digest":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","mediaType":"application/vnd.oci.image.manifest.v1+json","platform":{"architecture":"amd64","os":"linux"},"size":1000},"#,
        r#"{"annotations":{"io.archmerge.tag":"aarch64_v1"},"digest":"sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","mediaType":"application/vnd.oci.image.manifest.v1+json","platform":{"architecture":"arm64","os":"linux","variant":"v8"},"size":1001},"#,
        r#"{"annotations":{"io.archmerge.amended":"sha256:eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee"},"digest":"sha256:dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd","mediaType":"application/vnd.oci.image.manifest.v1+json","platform":{"architecture":"amd64","os":"windows","os.version":"10.0.20348.1"},"size":1002},"#,
        r#"{"annotations":{"io.archmerge.tag":"aarch64_v1","vnd.docker.reference.digest":"sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","vnd.docker.reference.type":"attestation-manifest"},"digest":"sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc","mediaType":"application/vnd.oci.image.manifest.v1+json","platform":{"architecture":"unknown","os":"unknown"},"size":500}"#,
        r#"],"mediaType":"application/vnd.oci.image.index.v1+json","schemaVersion":2}"#,
    );
    assert_eq!(String::from_utf8(built.bytes.clone()).unwrap(), want);
    assert_eq!(built.media_type, OCI_INDEX);
    assert_eq!(built.digest, sha256_digest(want.as_bytes()));
    assert!(built.dropped.is_empty());
}

#[test]
fn sha256_digest_is_prefixed_lowercase_hex() {
    assert_eq!(
        sha256_digest(b""),
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}

#[test]
fn rebuilding_from_its_own_output_is_identical() {
    let annotations = BTreeMap::from([("a".to_owned(), "b".to_owned())]);
    let first = build_index(&fixture(), IndexFormat::Auto, &annotations).unwrap();
    let Manifest::Index(index) = parse_manifest(Some(OCI_INDEX), &first.bytes).unwrap() else {
        panic!("not an index");
    };
    let again = build_index(
        &index_entries(&first.digest, &index),
        IndexFormat::Auto,
        &annotations,
    )
    .unwrap();
    assert_eq!(again.bytes, first.bytes);
}

#[test]
fn managed_beats_amended_and_takes_its_attestations_along() {
    let entries = vec![
        amended('a', "linux/amd64", 'f'),
        attestation('c', 'a', EntrySource::Amended { from: dg('f') }),
        image('b', "linux/x86_64", "x86_64_v1"),
    ];
    let built = build(&entries);
    assert_eq!(digests(&built), [dg('b')]);
    let reasons: Vec<_> = built
        .dropped
        .iter()
        .map(|d| (d.entry.descriptor.digest().to_string(), d.reason.clone()))
        .collect();
    assert_eq!(
        reasons,
        [
            (dg('a'), DropReason::Superseded { by: dg('b') }),
            (dg('c'), DropReason::OrphanAttestation),
        ]
    );
}

#[test]
fn of_two_managed_images_the_smaller_arch_tag_wins() {
    let entries = vec![
        image('a', "linux/x86_64", "x86_64_v1"),
        image('b', "linux/amd64", "amd64_v1"),
    ];
    for order in [entries.clone(), entries.iter().rev().cloned().collect()] {
        let built = build(&order);
        assert_eq!(digests(&built), [dg('b')]);
        assert_eq!(
            built.dropped[0].reason,
            DropReason::Superseded { by: dg('b') }
        );
    }
}

#[test]
fn amended_entries_of_an_unprovided_platform_are_all_kept() {
    let mut ltsc2019 = amended('a', "windows/amd64", 'f');
    ltsc2019.platform.os_version = Some("10.0.17763.1".into());
    let mut ltsc2022 = amended('b', "windows/amd64", 'f');
    ltsc2022.platform.os_version = Some("10.0.20348.1".into());
    let built = build(&[ltsc2022, ltsc2019.clone(), ltsc2019]);
    assert_eq!(digests(&built), [dg('a'), dg('b')]);
    assert_eq!(built.dropped.len(), 1);
    assert_eq!(built.dropped[0].reason, DropReason::Duplicate);
}

#[test]
fn stale_archmerge_annotations_are_replaced() {
    let mut e = amended('a', "linux/amd64", 'f');
    e.descriptor.set_annotations(Some(
        [
            (ANN_SOURCE_TAG.to_owned(), "old_tag".to_owned()),
            ("io.archmerge.other".to_owned(), "x".to_owned()),
            ("keep".to_owned(), "me".to_owned()),
        ]
        .into(),
    ));
    let text = String::from_utf8(build(&[e]).bytes).unwrap();
    let want = format!(
        r#""annotations":{{"io.archmerge.amended":"{}","keep":"me"}}"#,
        dg('f')
    );
    assert!(text.contains(&want), "{text}");
}

#[test]
fn docker_list_iff_every_child_is_docker() {
    let docker = |c: char, platform: &str, tag: &str| Entry {
        descriptor: desc(DOCKER_MANIFEST, c, 528),
        ..image(c, platform, tag)
    };
    let annotations = BTreeMap::from([("a".to_owned(), "b".to_owned())]);
    let all_docker = [
        docker('a', "linux/amd64", "amd64"),
        docker('b', "linux/arm64", "arm64"),
    ];
    let built = build_index(&all_docker, IndexFormat::Auto, &annotations).unwrap();
    assert_eq!(built.media_type, DOCKER_LIST);
    let text = String::from_utf8(built.bytes).unwrap();
    assert!(text.ends_with(r#""mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","schemaVersion":2}"#), "{text}");
    assert!(
        !text.starts_with(r#"{"annotations""#),
        "index annotations are OCI only: {text}"
    );

    let forced = build_index(&all_docker, IndexFormat::Oci, &annotations).unwrap();
    assert_eq!(forced.media_type, OCI_INDEX);

    let mixed = [
        docker('a', "linux/amd64", "amd64"),
        image('b', "linux/arm64", "arm64"),
    ];
    assert_eq!(build(&mixed).media_type, OCI_INDEX);
    assert_eq!(
        build_index(&mixed, IndexFormat::Docker, &annotations),
        Err(IndexError::DockerIncompatible {
            digest: dg('b'),
            media_type: OCI_MANIFEST.into()
        })
    );

    // buildx attestations are OCI manifests: Docker images with attestations make an OCI index.
    let with_attestation = [
        docker('a', "linux/amd64", "amd64"),
        attestation('c', 'a', managed("amd64")),
    ];
    assert_eq!(build(&with_attestation).media_type, OCI_INDEX);
}

#[test]
fn nothing_to_list_is_an_error() {
    assert_eq!(
        build_index(&[], IndexFormat::Auto, &BTreeMap::new()),
        Err(IndexError::Empty)
    );
    let orphan = [attestation('c', 'a', managed("amd64"))];
    assert_eq!(
        build_index(&orphan, IndexFormat::Auto, &BTreeMap::new()),
        Err(IndexError::Empty)
    );
}

#[test]
fn an_image_of_unknown_platform_keeps_its_descriptor_as_is() {
    let mut e = amended('a', "linux/amd64", 'f');
    e.platform = Platform::default();
    let text = String::from_utf8(build(&[e]).bytes).unwrap();
    assert!(!text.contains("platform"), "{text}");
}

/// A bigger set with every kind of collision, for the order-independence property.
fn collisions() -> Vec<Entry> {
    let mut entries = fixture();
    entries.extend([
        image('1', "linux/amd64", "amd64_v1"),
        amended('2', "linux/arm/v7", 'f'),
        attestation('3', '2', EntrySource::Amended { from: dg('f') }),
        amended('4', "linux/arm64", 'f'),
        attestation('5', '4', EntrySource::Amended { from: dg('f') }),
        attestation('6', '1', managed("amd64_v1")),
        attestation('6', '1', managed("amd64_v1")),
        image('1', "linux/amd64", "amd64_v1"),
        attestation('7', '9', managed("gone")),
        amended('2', "linux/arm/v7", 'f'),
    ]);
    entries
}

proptest! {
    #[test]
    fn any_input_order_gives_the_same_bytes(shuffled in Just(collisions()).prop_shuffle()) {
        let reference = build(&collisions());
        let built = build(&shuffled);
        prop_assert_eq!(&built.bytes, &reference.bytes);
        prop_assert_eq!(&built.digest, &reference.digest);
        let summary = |b: &BuiltIndex| {
            let mut s: Vec<_> = b.dropped.iter().map(|d| (d.entry.descriptor.digest().to_string(), d.reason.clone())).collect();
            s.sort_by(|x, y| x.0.cmp(&y.0));
            s
        };
        prop_assert_eq!(summary(&built), summary(&reference));
    }
}

#[test]
fn collisions_resolve_as_documented() {
    let built = build(&collisions());
    assert_eq!(
        digests(&built),
        [
            dg('1'),
            dg('2'),
            dg('b'),
            dg('d'),
            dg('6'),
            dg('3'),
            dg('c')
        ],
        "amd64: amd64_v1 beats x86_64_v1; arm/v7 amended; arm64 managed beats amended; windows"
    );
}

#[test]
fn settings_deserialize_from_lowercase_names() {
    let format = |s: &str| serde_json::from_str::<IndexFormat>(s).ok();
    assert_eq!(format(r#""auto""#), Some(IndexFormat::Auto));
    assert_eq!(format(r#""oci""#), Some(IndexFormat::Oci));
    assert_eq!(format(r#""docker""#), Some(IndexFormat::Docker));
    assert_eq!(format(r#""OCI""#), None);
    let source = |s: &str| serde_json::from_str::<PlatformSource>(s).ok();
    assert_eq!(source(r#""alias""#), Some(PlatformSource::Alias));
    assert_eq!(source(r#""config""#), Some(PlatformSource::Config));
}
