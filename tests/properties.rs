//! Properties of the canonical index for random entry sets, through the
//! public API only (SPEC §3: one entry per platform, canonical bytes, the
//! same set of children always gives the same digest).
//!
//! `src/index/tests.rs` already shuffles one fixed set of colliding entries
//! and checks golden bytes; `src/rules/tests.rs` checks that `match_tag`
//! never panics. What is added here is the same promises over *random* sets:
//! entries drawn from small pools (digests, platforms in several spellings,
//! arch tags) so that collisions — two arch tags for one platform, a managed
//! and an amended entry, an orphaned attestation, the same child twice —
//! come up in most cases.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;

use archmerge::index::{
    build_index, index_entries, parse_manifest, BuiltIndex, Entry, EntryKind, EntrySource,
    IndexFormat, Manifest, ANN_REF_DIGEST, ANN_REF_TYPE, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX,
    OCI_MANIFEST, REF_TYPE_ATTESTATION,
};
use archmerge::oci::{is_valid_name, is_valid_tag};
use archmerge::platform::{Platform, PlatformKey};
use archmerge::route::{self, Reference, Route};
use archmerge::rules::{AliasTable, Pattern, TagRules};
use oci_spec::image::{Descriptor, Digest, MediaType};
use proptest::prelude::*;

// === random entry sets ===

/// Platforms in the spellings registries and tags use (several spell the
/// same platform, which must still give one entry).
const PLATFORMS: &[&str] = &[
    "linux/amd64",
    "linux/x86_64",
    "linux/AMD64",
    "linux/arm64",
    "linux/aarch64/v8",
    "linux/arm/v7",
    "linux/arm/v6",
    "linux/armhf",
    "linux/386",
    "linux/i686",
    "linux/ppc64le",
    "linux/s390x",
    "windows/amd64",
];

const TAGS: &[&str] = &[
    "x86_64_v1",
    "amd64_v1",
    "aarch64_v1",
    "arm64_v1",
    "armv7l_v1",
    "armhf_v1",
    "i386_v1",
    "ppc64le_v1",
];

fn digest(n: u8) -> String {
    format!("sha256:{}", format!("{:x}", n % 16).repeat(64))
}

/// What one random entry is; turned into an [`Entry`] by [`entry`].
///
/// A digest names content, so the descriptor fields that come from the
/// content (media type, size) are functions of the digest: two entries with
/// one digest and different sizes cannot happen in a registry, and the
/// builder breaks such ties by input order.
#[derive(Clone, Debug)]
struct Spec {
    digest: u8,
    platform: usize,
    os_version: Option<u8>,
    /// `Some(n)`: an attestation of the image with digest `n`.
    attestation_of: Option<u8>,
    /// `Some(n)`: managed from arch tag `n`; `None`: amended.
    managed: Option<usize>,
    from: u8,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        (0u8..10, 0..PLATFORMS.len()),
        (
            proptest::option::weighted(0.2, 0u8..3),
            proptest::option::weighted(0.2, 0u8..10),
            proptest::option::weighted(0.7, 0..TAGS.len()),
            10u8..13,
        ),
    )
        .prop_map(
            |((digest, platform), (os_version, attestation_of, managed, from))| Spec {
                digest,
                platform,
                os_version,
                attestation_of,
                managed,
                from,
            },
        )
}

/// The entry `s` describes; the digests whose bit is set in `docker` are
/// Docker schema2 manifests, the others OCI.
fn entry(s: &Spec, docker: u16) -> Entry {
    let media_type = if docker & (1 << s.digest) != 0 {
        DOCKER_MANIFEST
    } else {
        OCI_MANIFEST
    };
    let mut d = Descriptor::new(
        MediaType::from(media_type),
        1000 + 7 * u64::from(s.digest),
        Digest::from_str(&digest(s.digest)).unwrap(),
    );
    let source = match s.managed {
        Some(t) => EntrySource::Managed {
            arch_tag: TAGS[t].to_owned(),
        },
        None => EntrySource::Amended {
            from: digest(s.from),
        },
    };
    match s.attestation_of {
        Some(of) => {
            // As buildx writes them: unknown/unknown, and the image they
            // belong to in the annotations.
            let unknown = Platform::new("unknown", "unknown", None);
            d.set_platform(Some(unknown.to_oci()));
            d.set_annotations(Some(HashMap::from([
                (ANN_REF_TYPE.to_owned(), REF_TYPE_ATTESTATION.to_owned()),
                (ANN_REF_DIGEST.to_owned(), digest(of)),
            ])));
            Entry {
                descriptor: d,
                platform: unknown,
                kind: EntryKind::Attestation { of: digest(of) },
                source,
            }
        }
        None => {
            let mut platform = Platform::parse(PLATFORMS[s.platform]).unwrap();
            platform.os_version = s.os_version.map(|v| format!("10.0.{v}"));
            Entry {
                descriptor: d,
                platform,
                kind: EntryKind::Image,
                source,
            }
        }
    }
}

/// A random entry set with at least one image, and a permutation of it.
fn entries_and_permutation() -> impl Strategy<Value = (Vec<Entry>, Vec<Entry>)> {
    // Every child Docker in about a third of the sets, so Docker lists come up.
    let docker = prop_oneof![Just(u16::MAX), any::<u16>(), Just(0)];
    (proptest::collection::vec(spec(), 1..20), docker)
        .prop_filter("needs an image", |(specs, _)| {
            specs.iter().any(|s| s.attestation_of.is_none())
        })
        .prop_map(|(specs, docker)| specs.iter().map(|s| entry(s, docker)).collect::<Vec<_>>())
        .prop_flat_map(|entries| {
            let shuffled = Just(entries.clone()).prop_shuffle();
            (Just(entries), shuffled)
        })
}

/// Like [`entries_and_permutation`], but each entry gets its own media type
/// and size whatever its digest: input no registry produces (one digest is
/// one content), which the builder must still order the same way.
fn contradictory_entries_and_permutation() -> impl Strategy<Value = (Vec<Entry>, Vec<Entry>)> {
    let contradictions = proptest::collection::vec((any::<bool>(), 1u64..5000), 20);
    (entries_and_permutation(), contradictions).prop_flat_map(|((entries, _), c)| {
        let entries: Vec<Entry> = entries
            .into_iter()
            .zip(c)
            .map(|(mut e, (docker, size))| {
                let mt = if docker {
                    DOCKER_MANIFEST
                } else {
                    OCI_MANIFEST
                };
                e.descriptor.set_media_type(MediaType::from(mt));
                e.descriptor.set_size(size);
                e
            })
            .collect();
        (Just(entries.clone()), Just(entries).prop_shuffle())
    })
}

fn format() -> impl Strategy<Value = IndexFormat> {
    prop_oneof![Just(IndexFormat::Auto), Just(IndexFormat::Oci)]
}

fn build(entries: &[Entry], format: IndexFormat) -> BuiltIndex {
    build_index(entries, format, &BTreeMap::new()).expect("an entry set with an image builds")
}

/// The entries of a built index, read back as archmerge reads a target.
fn reread(built: &BuiltIndex) -> Vec<Entry> {
    match parse_manifest(Some(built.media_type), &built.bytes).expect("the index parses") {
        Manifest::Index(index) => index_entries(&built.digest, &index),
        Manifest::Image(_) => panic!("the index reads back as an image"),
    }
}

fn text(b: &BuiltIndex) -> String {
    String::from_utf8_lossy(&b.bytes).into_owned()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Order independence: the same set in any order gives the same bytes,
    /// the same digest, and drops the same entries.
    #[test]
    fn any_order_of_a_random_set_gives_the_same_bytes(
        (entries, shuffled) in entries_and_permutation(),
        format in format(),
    ) {
        let a = build(&entries, format);
        let b = build(&shuffled, format);
        prop_assert_eq!(text(&a), text(&b));
        prop_assert_eq!(&a.digest, &b.digest);
        prop_assert_eq!(a.dropped.len(), b.dropped.len());
    }

    /// The same, for entries that contradict each other (one digest, two
    /// sizes or media types): still one answer whatever the order.
    #[test]
    fn even_contradictory_entries_give_the_same_bytes_in_any_order(
        (entries, shuffled) in contradictory_entries_and_permutation(),
        format in format(),
    ) {
        prop_assert_eq!(text(&build(&entries, format)), text(&build(&shuffled, format)));
    }

    /// Idempotence: parse the output, rebuild from its own entries, and get
    /// the same bytes — what lets a replica see "nothing changed, nothing
    /// written" after another replica wrote.
    #[test]
    fn rebuilding_from_the_parsed_output_gives_the_same_bytes(
        (entries, _) in entries_and_permutation(),
        format in format(),
    ) {
        let first = build(&entries, format);
        let again = build(&reread(&first), format);
        prop_assert_eq!(text(&first), text(&again));
        prop_assert_eq!(first.digest, again.digest);
        prop_assert!(again.dropped.is_empty(), "{:?}", again.dropped);
    }

    /// One entry per platform: a platform that a managed entry provides is
    /// listed exactly once, by a managed image, however many arch tags and
    /// amended entries claim it and however they spell it.
    #[test]
    fn a_platform_with_a_managed_entry_is_listed_once(
        (entries, _) in entries_and_permutation(),
        format in format(),
    ) {
        let built = build(&entries, format);
        let listed = reread(&built);
        let managed_platforms: BTreeSet<PlatformKey> = entries
            .iter()
            .filter(|e| e.kind == EntryKind::Image && matches!(e.source, EntrySource::Managed { .. }))
            .map(|e| e.platform.key())
            .collect();
        for key in &managed_platforms {
            let images: Vec<&Entry> = listed
                .iter()
                .filter(|e| e.kind == EntryKind::Image && e.platform.key() == *key)
                .collect();
            prop_assert_eq!(images.len(), 1, "{}: {}", key, text(&built));
            let managed = matches!(images[0].source, EntrySource::Managed { .. });
            prop_assert!(managed, "{} is listed by an amended image", key);
        }
        // Every listed image's platform is emitted in its normal form.
        for e in listed.iter().filter(|e| e.kind == EntryKind::Image) {
            prop_assert_eq!(&e.platform.normalized(), &e.platform);
        }
        // Every attestation follows an image that is listed.
        let images: BTreeSet<String> = listed
            .iter()
            .filter(|e| e.kind == EntryKind::Image)
            .map(|e| e.descriptor.digest().to_string())
            .collect();
        for e in &listed {
            if let EntryKind::Attestation { of } = &e.kind {
                prop_assert!(images.contains(of), "orphan attestation of {}", of);
            }
        }
    }

    /// Giving an entry twice changes nothing.
    #[test]
    fn a_duplicated_entry_changes_nothing(
        (entries, _) in entries_and_permutation(),
        pick in any::<prop::sample::Index>(),
    ) {
        let mut doubled = entries.clone();
        doubled.push(pick.get(&entries).clone());
        prop_assert_eq!(text(&build(&entries, IndexFormat::Auto)), text(&build(&doubled, IndexFormat::Auto)));
    }

    /// The media type: a Docker list exactly when every listed child is a
    /// Docker schema2 manifest (under `Auto`); `mediaType` always present.
    #[test]
    fn a_docker_list_iff_every_child_is_docker(
        (entries, _) in entries_and_permutation(),
    ) {
        let built = build(&entries, IndexFormat::Auto);
        let listed = reread(&built);
        let all_docker = listed.iter().all(|e| e.descriptor.media_type().as_ref() == DOCKER_MANIFEST);
        prop_assert_eq!(built.media_type, if all_docker { DOCKER_LIST } else { OCI_INDEX });
        let json: serde_json::Value = serde_json::from_slice(&built.bytes).unwrap();
        prop_assert_eq!(json["mediaType"].as_str(), Some(built.media_type));
        prop_assert_eq!(&json["schemaVersion"], 2);
    }

    /// A manifest path built from any valid name and tag routes back to
    /// exactly that name and tag.
    #[test]
    fn a_valid_name_and_tag_route_back_to_themselves(
        name in "[a-z0-9]{1,8}(([._]|__|-+)[a-z0-9]{1,8}){0,2}(/[a-z0-9]{1,8}(([._]|__|-+)[a-z0-9]{1,8}){0,2}){0,4}",
        tag in "[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}",
    ) {
        prop_assume!(is_valid_name(&name) && is_valid_tag(&tag));
        let path = format!("/v2/{name}/manifests/{tag}");
        prop_assert_eq!(
            route::parse(&path).unwrap(),
            Route::Manifest { name, reference: Reference::Tag(tag) }
        );
    }

    /// The arch tags that feed a target are exactly the tags whose match
    /// names that target, under any patterns: the cheap first cut over a
    /// listing never drops one.
    #[test]
    fn the_arch_tags_of_a_target_are_those_whose_match_names_it(
        patterns in prop::collection::vec(
            prop::sample::select(vec!["{arch}_{tag}", "{tag}-{arch}", "{arch}", "v{tag}.{arch}", "{arch}-{tag}-x"]),
            1..4,
        ),
        tags in prop::collection::vec("(aarch64|x86_64|arm64|amd64|armhf|x86|latest|v1|v1.2)([_.-](aarch64|x86_64|amd64|x86|latest|v1|v1.2|x)){0,3}", 0..40),
        target in prop::sample::select(vec!["latest", "v1", "v1.2", "x", "1.2"]),
    ) {
        let patterns: Vec<Pattern> = patterns.iter().map(|p| Pattern::parse(p).unwrap()).collect();
        let rules = TagRules::new(AliasTable::default_table(), patterns);
        let mut want: Vec<String> = tags
            .iter()
            .filter(|t| rules.match_tag(t).is_some_and(|m| m.target == target))
            .cloned()
            .collect();
        want.sort();
        want.dedup();
        let got: Vec<String> = rules
            .arch_tags_for_target(tags.iter().map(String::as_str), target)
            .into_iter()
            .map(|m| m.tag)
            .collect();
        prop_assert_eq!(got, want);
    }
}

/// The smallest case the property above finds: one image and two
/// attestations of it that share a digest and an arch tag but not their
/// size. Images got a total order for such contradictions (commit
/// f91f07a); attestations are still ordered by (image, digest, source)
/// only and deduplicated keeping the first, so the input order decides
/// which size is written.
#[test]
fn contradictory_attestations_are_ordered_the_same_way_whatever_the_input_order() {
    let image = entry(
        &Spec {
            digest: 6,
            platform: 0,
            os_version: None,
            attestation_of: None,
            managed: Some(0),
            from: 10,
        },
        0,
    );
    let attestation = |size: u64| {
        let mut e = entry(
            &Spec {
                digest: 8,
                platform: 0,
                os_version: None,
                attestation_of: Some(6),
                managed: Some(0),
                from: 10,
            },
            0,
        );
        e.descriptor.set_size(size);
        e
    };
    let one = vec![image.clone(), attestation(1104), attestation(4123)];
    let other = vec![image, attestation(4123), attestation(1104)];
    assert_eq!(
        text(&build(&one, IndexFormat::Oci)),
        text(&build(&other, IndexFormat::Oci))
    );
}
