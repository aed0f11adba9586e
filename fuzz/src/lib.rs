//! Shared by the fuzz targets: entry sets built from fuzz data, and the
//! canonical-index checks the `index_build` and `manifest_parse` targets
//! assert.
//!
//! Entry sets are drawn from small pools (a dozen digests, a handful of
//! platforms in several spellings, a few arch tags) so that the cases the
//! builder must resolve — two entries for one platform, a managed and an
//! amended entry colliding, an attestation whose image is gone, the same
//! child twice — come up all the time instead of never.

use std::collections::BTreeMap;
use std::str::FromStr;

use arbitrary::{Arbitrary, Unstructured};
use archmerge::index::{
    build_index, index_entries, parse_manifest, BuiltIndex, Entry, EntryKind, EntrySource,
    IndexFormat, Manifest, ANN_REF_DIGEST, ANN_REF_TYPE, ANN_SOURCE_TAG,
    DOCKER_MANIFEST, OCI_MANIFEST, REF_TYPE_ATTESTATION,
};
use archmerge::platform::{Platform, PlatformKey};
use oci_spec::image::{Descriptor, Digest, MediaType};

/// Platforms in the spellings registries and tags use.
const PLATFORMS: &[(&str, &str, Option<&str>)] = &[
    ("linux", "amd64", None),
    ("linux", "x86_64", None),
    ("linux", "AMD64", None),
    ("linux", "arm64", None),
    ("linux", "aarch64", Some("v8")),
    ("linux", "arm", Some("v7")),
    ("linux", "arm", Some("v6")),
    ("linux", "armhf", None),
    ("linux", "386", None),
    ("linux", "i686", None),
    ("linux", "ppc64le", None),
    ("linux", "s390x", None),
    ("linux", "riscv64", None),
    ("windows", "amd64", None),
    ("unknown", "unknown", None),
    ("", "", None),
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

const OS_VERSIONS: &[&str] = &["10.0.17763.1", "10.0.20348.1", "10.0.26100.1"];

/// `sha256:` and 64 times the hex digit of `n` (mod 16).
pub fn digest(n: u8) -> String {
    let c = char::from_digit(u32::from(n % 16), 16).unwrap_or('0');
    format!("sha256:{}", c.to_string().repeat(64))
}

/// One entry as fuzz data describes it.
///
/// A digest names content, so what comes from the content (media type,
/// size) is a function of the digest; see [`EntrySpec::entry`].
#[derive(Arbitrary, Debug, Clone)]
pub struct EntrySpec {
    digest: u8,
    platform: u8,
    os_version: Option<u8>,
    feature: bool,
    /// `None`: an image; `Some(n)`: an attestation of the image with digest `n`.
    attestation_of: Option<u8>,
    /// `None`: amended from digest `from`; `Some(n)`: managed from arch tag `n`.
    managed: Option<u8>,
    from: u8,
    /// A stale `io.archmerge.*` annotation left on the descriptor.
    stale: bool,
    /// The descriptor's own platform, as the registry had it.
    own_platform: bool,
}

impl EntrySpec {
    /// The entry this describes; digests whose bit is set in `docker` are
    /// Docker schema2 manifests, the others OCI.
    pub fn entry(&self, docker: u16) -> Entry {
        let (os, arch, variant) = PLATFORMS[usize::from(self.platform) % PLATFORMS.len()];
        let mut platform = Platform::new(os, arch, variant);
        let known = !os.is_empty();
        if known {
            platform.os_version = self
                .os_version
                .map(|v| OS_VERSIONS[usize::from(v) % OS_VERSIONS.len()].to_owned());
            if self.feature {
                platform.os_features = vec!["win32k".to_owned()];
            }
        }
        let media_type = if docker & (1 << (self.digest % 16)) != 0 {
            DOCKER_MANIFEST
        } else {
            OCI_MANIFEST
        };
        let mut d = Descriptor::new(
            MediaType::from(media_type),
            1000 + 7 * u64::from(self.digest % 16),
            Digest::from_str(&digest(self.digest)).expect("a valid digest"),
        );
        let mut annotations = std::collections::HashMap::new();
        if self.stale {
            annotations.insert(ANN_SOURCE_TAG.to_owned(), "stale".to_owned());
        }
        let kind = match self.attestation_of {
            None => EntryKind::Image,
            Some(of) => {
                annotations.insert(ANN_REF_TYPE.to_owned(), REF_TYPE_ATTESTATION.to_owned());
                annotations.insert(ANN_REF_DIGEST.to_owned(), digest(of));
                EntryKind::Attestation { of: digest(of) }
            }
        };
        if !annotations.is_empty() {
            d.set_annotations(Some(annotations));
        }
        // buildx writes unknown/unknown on attestations; images may carry
        // their own platform, which archmerge overrides with the entry's.
        if matches!(kind, EntryKind::Attestation { .. }) {
            d.set_platform(Some(Platform::new("unknown", "unknown", None).to_oci()));
            platform = Platform::new("unknown", "unknown", None);
        } else if self.own_platform && known {
            d.set_platform(Some(platform.to_oci()));
        }
        let source = match self.managed {
            Some(t) => EntrySource::Managed {
                arch_tag: TAGS[usize::from(t) % TAGS.len()].to_owned(),
            },
            None => EntrySource::Amended {
                from: digest(self.from),
            },
        };
        Entry {
            descriptor: d,
            platform,
            kind,
            source,
        }
    }
}

/// An entry set, an output format and index annotations, from fuzz data.
#[derive(Debug)]
pub struct Case {
    /// The entries, in the order given.
    pub entries: Vec<Entry>,
    /// Auto, OCI or Docker.
    pub format: IndexFormat,
    /// Index-level annotations.
    pub annotations: BTreeMap<String, String>,
    /// A permutation of the entries' order, for the order-independence check.
    pub permuted: Vec<Entry>,
}

impl<'a> Arbitrary<'a> for Case {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let docker: u16 = match u.int_in_range(0..=2)? {
            0 => 0,
            1 => u16::MAX,
            _ => u.arbitrary()?,
        };
        let specs: Vec<EntrySpec> = u.arbitrary_iter()?.take(24).collect::<Result<_, _>>()?;
        let entries: Vec<Entry> = specs.iter().map(|s| s.entry(docker)).collect();
        let format = match u.int_in_range(0..=2)? {
            0 => IndexFormat::Auto,
            1 => IndexFormat::Oci,
            _ => IndexFormat::Docker,
        };
        let mut annotations = BTreeMap::new();
        if u.arbitrary()? {
            annotations.insert(
                "org.opencontainers.image.created".to_owned(),
                "2024-01-01T00:00:00Z".to_owned(),
            );
        }
        if u.arbitrary()? {
            annotations.insert("io.archmerge.base".to_owned(), digest(u.arbitrary()?));
        }
        // A Fisher-Yates shuffle driven by the remaining data.
        let mut permuted = entries.clone();
        for i in (1..permuted.len()).rev() {
            let j = u.int_in_range(0..=i)?;
            permuted.swap(i, j);
        }
        Ok(Case {
            entries,
            format,
            annotations,
            permuted,
        })
    }
}

/// Parses built index bytes back into entries, or says why it cannot.
pub fn reread(built: &BuiltIndex) -> Result<Vec<Entry>, String> {
    match parse_manifest(Some(built.media_type), &built.bytes) {
        Ok(Manifest::Index(index)) => Ok(index_entries(&built.digest, &index)),
        Ok(Manifest::Image(_)) => Err("the built index reads back as an image".into()),
        Err(e) => Err(format!("the built index does not parse: {e}")),
    }
}

/// Everything "canonical" promises of an index built from `case`:
/// another order gives the same bytes; the output parses; rebuilding from
/// the parsed output gives the same bytes; one image per platform that a
/// managed entry provides; `mediaType` always present.
pub fn check_canonical(case: &Case) {
    let Ok(built) = build_index(&case.entries, case.format, &case.annotations) else {
        // Refusals (no entries, a Docker list of OCI children) must not
        // depend on the order either.
        assert!(
            build_index(&case.permuted, case.format, &case.annotations).is_err(),
            "refused in one order, built in another"
        );
        return;
    };
    let again = build_index(&case.permuted, case.format, &case.annotations)
        .expect("built in one order, refused in another");
    assert_eq!(
        String::from_utf8_lossy(&built.bytes),
        String::from_utf8_lossy(&again.bytes),
        "input order changed the bytes"
    );
    assert_eq!(built.digest, again.digest);
    assert_eq!(built.digest, archmerge::index::sha256_digest(&built.bytes));

    let json: serde_json::Value =
        serde_json::from_slice(&built.bytes).expect("the index is JSON");
    assert_eq!(json["mediaType"].as_str(), Some(built.media_type));
    assert_eq!(json["schemaVersion"], 2);

    let entries = reread(&built).unwrap_or_else(|e| panic!("{e}"));
    let rebuilt = build_index(&entries, case.format, &case.annotations)
        .unwrap_or_else(|e| panic!("rebuilding from the index's own entries failed: {e}"));
    assert_eq!(
        String::from_utf8_lossy(&built.bytes),
        String::from_utf8_lossy(&rebuilt.bytes),
        "rebuilding from the parsed output changed the bytes"
    );

    let mut managed: BTreeMap<PlatformKey, usize> = BTreeMap::new();
    for e in entries.iter().filter(|e| e.kind == EntryKind::Image) {
        if matches!(e.source, EntrySource::Managed { .. }) {
            *managed.entry(e.platform.key()).or_default() += 1;
        }
    }
    for e in entries.iter().filter(|e| e.kind == EntryKind::Image) {
        if let Some(n) = managed.get(&e.platform.key()) {
            assert_eq!(*n, 1, "{} managed images for {}", n, e.platform.key());
            assert!(
                matches!(e.source, EntrySource::Managed { .. }),
                "an amended image listed beside a managed one for {}",
                e.platform.key()
            );
        }
    }
    // Amended entries keep where they came from.
    for e in &entries {
        if let EntrySource::Amended { from } = &e.source {
            assert!(from.starts_with("sha256:"), "amended from {from:?}");
        }
    }
}
