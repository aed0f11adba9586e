//! `decide` driven through every case without a registry: arch sources,
//! amend, a new base at the target, required sets, fall back, artifacts,
//! unreadable and unusable sources, children of other repositories.

use std::str::FromStr;

use bytes::Bytes;
use oci_spec::image::{Descriptor, Digest, MediaType};

use super::*;
use crate::index::{EntryKind, EntrySource, OCI_INDEX, OCI_MANIFEST};
use crate::merge::Child;
use crate::platform::Platform;
use crate::rules::{ArchTag, TagRules};

fn dg(c: char) -> String {
    format!("sha256:{}", c.to_string().repeat(64))
}

fn image(digest: char, platform: &str, source: EntrySource) -> Entry {
    Entry {
        descriptor: Descriptor::new(
            MediaType::from(OCI_MANIFEST),
            1000,
            Digest::from_str(&dg(digest)).unwrap(),
        ),
        platform: Platform::parse(platform).unwrap(),
        kind: EntryKind::Image,
        source,
    }
}

fn managed(digest: char, platform: &str, tag: &str) -> Entry {
    image(
        digest,
        platform,
        EntrySource::Managed {
            arch_tag: tag.into(),
        },
    )
}

fn amended(digest: char, platform: &str, from: char) -> Entry {
    image(digest, platform, EntrySource::Amended { from: dg(from) })
}

fn child(repo: &str, tag: &str, platform: &str, digest: char) -> Child {
    Child {
        repo: repo.into(),
        arch: ArchTag {
            tag: tag.into(),
            alias: tag.split('_').next().unwrap().into(),
            platform: Platform::parse(platform).unwrap(),
            target: "v1".into(),
        },
        digest: Some(dg(digest)),
    }
}

/// An arch source `tag` of `app` whose image is `digest`.
fn arch(tag: &str, platform: &str, digest: char) -> (Child, Contribution) {
    let entries = vec![managed(digest, platform, tag)];
    (
        child("app", tag, platform, digest),
        Contribution::Entries(entries),
    )
}

fn current(digest: char, ours: bool, entries: Vec<Entry>, base: Option<char>) -> Current {
    let amended = entries
        .iter()
        .filter(|e| !ours || matches!(e.source, EntrySource::Amended { .. }))
        .cloned()
        .collect();
    Current {
        manifest: FetchedManifest {
            digest: dg(digest),
            bytes: Bytes::new(),
            media_type: OCI_INDEX.into(),
        },
        ours,
        amended,
        base: base.map(dg),
        entries,
    }
}

fn rule() -> Rule {
    Rule::from_tags(TagRules::default())
}

/// The (platform, digest, managed arch tag) of each entry of an index.
fn listed(d: &Decision) -> Vec<(String, String, Option<String>)> {
    let Desired::Index(built) = &d.desired else {
        panic!("not an index: {:?}", d.desired);
    };
    let idx: oci_spec::image::ImageIndex = serde_json::from_slice(&built.bytes).unwrap();
    idx.manifests()
        .iter()
        .map(|m| {
            let p = m.platform().as_ref().unwrap();
            let tag = m
                .annotations()
                .as_ref()
                .and_then(|a| a.get(crate::index::ANN_SOURCE_TAG).cloned());
            (
                format!("{}/{}", p.os(), p.architecture()),
                m.digest().to_string(),
                tag,
            )
        })
        .collect()
}

fn base_of(d: &Decision) -> Option<String> {
    let Desired::Index(built) = &d.desired else {
        return None;
    };
    let idx: oci_spec::image::ImageIndex = serde_json::from_slice(&built.bytes).unwrap();
    idx.annotations().as_ref()?.get(ANN_BASE).cloned()
}

#[test]
fn arch_sources_make_an_index_of_their_images() {
    let children = [
        arch("x86_64_v1", "linux/amd64", 'a'),
        arch("aarch64_v1", "linux/arm64/v8", 'b'),
    ];
    let d = decide(&rule(), "app", &children, None).unwrap();
    assert_eq!(
        listed(&d),
        [
            ("linux/amd64".into(), dg('a'), Some("x86_64_v1".into())),
            ("linux/arm64".into(), dg('b'), Some("aarch64_v1".into())),
        ]
    );
    assert_eq!(base_of(&d), None);
    assert!(d.copies.is_empty() && d.missing.is_empty());
}

#[test]
fn no_arch_source_and_nothing_of_ours_is_nothing() {
    assert_eq!(
        decide(&rule(), "app", &[], None).unwrap().desired,
        Desired::Nothing
    );
    // A plain list at a tag without arch tags stays as it is.
    let foreign = current(
        'f',
        false,
        vec![amended('5', "linux/s390x", 'f')],
        Some('f'),
    );
    let d = decide(&rule(), "app", &[], Some(&foreign)).unwrap();
    assert_eq!(d.desired, Desired::Nothing);
}

#[test]
fn a_list_pushed_at_the_target_is_amended_and_becomes_the_base() {
    // `buildah manifest push --all` of s390x + amd64 at the target, while
    // the arch tag x86_64_v1 exists: the arch tag wins amd64, s390x stays.
    let pushed = current(
        '1',
        false,
        vec![
            amended('5', "linux/s390x", '1'),
            amended('0', "linux/amd64", '1'),
        ],
        Some('1'),
    );
    let children = [arch("x86_64_v1", "linux/amd64", 'a')];
    let d = decide(&rule(), "app", &children, Some(&pushed)).unwrap();
    assert_eq!(
        listed(&d),
        [
            ("linux/amd64".into(), dg('a'), Some("x86_64_v1".into())),
            ("linux/s390x".into(), dg('5'), None),
        ]
    );
    assert_eq!(base_of(&d), Some(dg('1')));
    // The list loses its tag to the index: it is kept by a tag of its own.
    assert_eq!(d.displaced.map(|m| m.digest), Some(dg('1')));
}

#[test]
fn a_plain_image_at_the_target_is_kept_where_no_arch_tag_provides_it() {
    let image_at_target = current(
        '7',
        false,
        vec![amended('7', "linux/riscv64", '7')],
        Some('7'),
    );
    let children = [arch("x86_64_v1", "linux/amd64", 'a')];
    let d = decide(&rule(), "app", &children, Some(&image_at_target)).unwrap();
    assert_eq!(listed(&d).len(), 2);
    assert_eq!(base_of(&d), Some(dg('7')));
}

#[test]
fn our_index_keeps_only_what_it_amended() {
    let ours = current(
        '9',
        true,
        vec![
            managed('0', "linux/arm64/v8", "aarch64_v1"),
            amended('5', "linux/s390x", '1'),
        ],
        Some('1'),
    );
    // aarch64_v1 is gone: its entry goes, the amended s390x stays.
    let children = [arch("x86_64_v1", "linux/amd64", 'a')];
    let d = decide(&rule(), "app", &children, Some(&ours)).unwrap();
    assert_eq!(
        listed(&d),
        [
            ("linux/amd64".into(), dg('a'), Some("x86_64_v1".into())),
            ("linux/s390x".into(), dg('5'), None),
        ]
    );
    assert_eq!(base_of(&d), Some(dg('1')));
    // archmerge's own index displaces nothing worth keeping.
    assert_eq!(d.displaced, None);
}

#[test]
fn the_last_arch_tag_gone_falls_back_to_the_base_or_deletes() {
    let with_base = current(
        '9',
        true,
        vec![managed('a', "linux/amd64", "x86_64_v1")],
        Some('1'),
    );
    let d = decide(&rule(), "app", &[], Some(&with_base)).unwrap();
    assert_eq!(
        d.desired,
        Desired::Restore {
            base: dg('1'),
            otherwise: Box::new(Desired::Delete)
        }
    );
    let without = current(
        '9',
        true,
        vec![managed('a', "linux/amd64", "x86_64_v1")],
        None,
    );
    let d = decide(&rule(), "app", &[], Some(&without)).unwrap();
    assert_eq!(d.desired, Desired::Delete);
    // The base is gone from the registry: what was kept of it is listed.
    let kept = current(
        '9',
        true,
        vec![
            managed('a', "linux/amd64", "x86_64_v1"),
            amended('5', "linux/s390x", '1'),
        ],
        Some('1'),
    );
    let d = decide(&rule(), "app", &[], Some(&kept)).unwrap();
    let Desired::Restore { base, otherwise } = d.desired else {
        panic!("no restore: {:?}", d.desired);
    };
    assert_eq!(base, dg('1'));
    assert!(matches!(*otherwise, Desired::Index(_)));
}

#[test]
fn a_required_set_publishes_nothing_until_complete() {
    let mut r = rule();
    r.required = [Platform::parse("linux/arm64/v8").unwrap().key()].into();
    let children = [arch("x86_64_v1", "linux/amd64", 'a')];
    let d = decide(&r, "app", &children, None).unwrap();
    assert_eq!(d.desired, Desired::Nothing);
    assert_eq!(d.missing, ["linux/arm64/v8"]);
    // What it had published is taken back.
    let ours = current(
        '9',
        true,
        vec![managed('a', "linux/amd64", "x86_64_v1")],
        None,
    );
    assert_eq!(
        decide(&r, "app", &children, Some(&ours)).unwrap().desired,
        Desired::Delete
    );
    let both = [
        arch("x86_64_v1", "linux/amd64", 'a'),
        arch("aarch64_v1", "linux/arm64/v8", 'b'),
    ];
    assert_eq!(listed(&decide(&r, "app", &both, None).unwrap()).len(), 2);
}

#[test]
fn an_artifact_at_an_arch_tag_neither_becomes_nor_displaces_an_entry() {
    // No index yet: an artifact alone publishes nothing.
    let artifact = (
        child("app", "aarch64_v1", "linux/arm64/v8", '2'),
        Contribution::NotImage("an artifact".into()),
    );
    let d = decide(&rule(), "app", std::slice::from_ref(&artifact), None).unwrap();
    assert_eq!(d.desired, Desired::Nothing);
    // The index lists the image aarch64_v1 held before the artifact: it stays.
    let ours = current(
        '9',
        true,
        vec![
            managed('a', "linux/amd64", "x86_64_v1"),
            managed('b', "linux/arm64/v8", "aarch64_v1"),
        ],
        None,
    );
    let children = [arch("x86_64_v1", "linux/amd64", 'c'), artifact];
    let d = decide(&rule(), "app", &children, Some(&ours)).unwrap();
    assert_eq!(
        listed(&d),
        [
            ("linux/amd64".into(), dg('c'), Some("x86_64_v1".into())),
            ("linux/arm64".into(), dg('b'), Some("aarch64_v1".into())),
        ]
    );
    assert!(!listed(&d).iter().any(|(_, digest, _)| *digest == dg('2')));
}

#[test]
fn unreadable_sources_keep_their_entries_and_unusable_ones_are_left_out() {
    let ours = current(
        '9',
        true,
        vec![
            managed('a', "linux/amd64", "x86_64_v1"),
            managed('b', "linux/arm64/v8", "app-arm64:v1"),
            managed('5', "linux/s390x", "s390x_v1"),
        ],
        None,
    );
    let mut unreadable = child("app-arm64", "app-arm64:v1", "linux/arm64/v8", 'b');
    unreadable.digest = None;
    let children = [
        arch("x86_64_v1", "linux/amd64", 'a'),
        (unreadable, Contribution::Unreadable),
        (
            child("app", "s390x_v1", "linux/s390x", '8'),
            Contribution::Unusable("no such platform".into()),
        ),
    ];
    let d = decide(&rule(), "app", &children, Some(&ours)).unwrap();
    let platforms: Vec<String> = listed(&d).into_iter().map(|l| l.0).collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
}

#[test]
fn children_of_other_repositories_are_copied_first() {
    let entries = vec![managed('b', "linux/arm64/v8", "wg/tool-arm64:v1")];
    let children = [
        arch("x86_64_v1", "linux/amd64", 'a'),
        (
            child("wg/tool-arm64", "wg/tool-arm64:v1", "linux/arm64/v8", 'b'),
            Contribution::Entries(entries),
        ),
    ];
    let d = decide(&rule(), "app", &children, None).unwrap();
    assert_eq!(d.copies, [("wg/tool-arm64".to_owned(), dg('b'))]);
}
