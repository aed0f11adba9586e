//! Platform normalisation and matching.
//!
//! Owns [`Platform`] (os/architecture/variant plus the config-only `os.version` and
//! `os.features`), its normalised identity [`PlatformKey`], parsing of platform strings such as
//! `linux/arm64/v8`, and the conversion to and from `oci_spec`'s platform type.
//!
//! Called by `rules` (the alias table maps tag aliases to platforms), by `index` (one entry per
//! [`PlatformKey`], canonical order, what is emitted) and by the merge engine and config loader.
//!
//! Pure: no I/O, no logging, no global state. Two platforms are compared only through
//! [`Platform::key`], which is always taken of the normalised form, so that `x86_64`, `amd64`
//! and `AMD64` can never end up as two entries of one index.

use std::fmt;

use oci_spec::image::{Arch, Os};

/// os/architecture/variant plus the config-only details.
///
/// A value may hold any spelling (`x86_64`, `aarch64`, …); [`Platform::normalized`] gives the
/// one form archmerge emits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Platform {
    /// Operating system, e.g. `linux` or `windows` (GOOS spelling once normalised).
    pub os: String,
    /// CPU architecture, e.g. `amd64` or `arm64` (GOARCH spelling once normalised).
    pub architecture: String,
    /// CPU variant, e.g. `v7` for `arm` or `v8` for `arm64`.
    pub variant: Option<String>,
    /// `os.version` from the image config; Windows images need it to pick the right entry.
    pub os_version: Option<String>,
    /// `os.features` from the image config (e.g. `win32k`).
    pub os_features: Vec<String>,
}

/// The identity of a platform for "one entry per platform": normalised (os, architecture,
/// variant).
///
/// Obtain it through [`Platform::key`]; a hand-built key is compared as given.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PlatformKey {
    /// Normalised operating system.
    pub os: String,
    /// Normalised architecture.
    pub architecture: String,
    /// Normalised variant (`None` where the architecture has no default variant).
    pub variant: Option<String>,
}

/// Why a platform string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlatformError {
    /// The string was empty.
    #[error("empty platform")]
    Empty,
    /// Only one component: archmerge needs at least `os/architecture`.
    #[error("platform `{0}` must be os/architecture[/variant]")]
    TooFewParts(String),
    /// More than three `/`-separated components.
    #[error("platform `{0}` has too many parts (expected os/architecture[/variant])")]
    TooManyParts(String),
    /// A component was empty (`linux//v7`, `/amd64`).
    #[error("platform `{0}` has an empty part")]
    EmptyPart(String),
    /// A component holds characters other than `[A-Za-z0-9_.-]`.
    #[error("platform `{input}`: invalid characters in `{part}`")]
    InvalidPart {
        /// The whole input.
        input: String,
        /// The offending component.
        part: String,
    },
}

// === impl Platform ===

impl Platform {
    /// A platform with just os and architecture (and an optional variant).
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Platform {
        Platform {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            variant: variant.map(str::to_owned),
            ..Platform::default()
        }
    }

    /// Parses `os/architecture[/variant]`, e.g. `linux/arm64/v8` or `windows/amd64`.
    ///
    /// The result is not normalised (call [`Platform::normalized`]). Unlike containerd, a bare
    /// `arm64` is rejected: there is no host whose OS could be assumed.
    pub fn parse(s: &str) -> Result<Platform, PlatformError> {
        if s.is_empty() {
            return Err(PlatformError::Empty);
        }
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() > 3 {
            return Err(PlatformError::TooManyParts(s.to_owned()));
        }
        if let Some(part) = parts.iter().find(|p| !p.is_empty() && !is_specifier(p)) {
            return Err(PlatformError::InvalidPart {
                input: s.to_owned(),
                part: (*part).to_owned(),
            });
        }
        if parts.iter().any(|p| p.is_empty()) {
            return Err(PlatformError::EmptyPart(s.to_owned()));
        }
        if parts.len() < 2 {
            return Err(PlatformError::TooFewParts(s.to_owned()));
        }
        Ok(Platform::new(parts[0], parts[1], parts.get(2).copied()))
    }

    /// The containerd-style normal form: lowercase os/architecture/variant, GOARCH names
    /// (`x86_64`→`amd64`, `aarch64`→`arm64`, `i686`→`386`, …) and default variants made
    /// explicit (`arm64`→`v8`, `arm`→`v7`) or dropped (`amd64`'s `v1`).
    ///
    /// Deviation from containerd: `armhf` without a variant becomes `arm/v6`, as the alias
    /// table of SPEC §1 annotates it (containerd says `v7`), so that an `armhf` config never
    /// disagrees with an `armhf` tag. `os.version` and `os.features` are kept verbatim.
    /// Idempotent.
    pub fn normalized(&self) -> Platform {
        let os = self.os.to_ascii_lowercase();
        let variant = self
            .variant
            .as_deref()
            .map(str::to_ascii_lowercase)
            .filter(|v| !v.is_empty());
        let (architecture, variant) =
            normalize_arch(&self.architecture.to_ascii_lowercase(), variant);
        Platform {
            os,
            architecture,
            variant,
            os_version: self.os_version.clone(),
            os_features: self.os_features.clone(),
        }
    }

    /// The identity of this platform, taken of the normalised form.
    pub fn key(&self) -> PlatformKey {
        let n = self.normalized();
        PlatformKey {
            os: n.os,
            architecture: n.architecture,
            variant: n.variant,
        }
    }

    /// Reads an `oci_spec` platform as it is (not normalised).
    pub fn from_oci(p: &oci_spec::image::Platform) -> Platform {
        Platform {
            os: p.os().to_string(),
            architecture: p.architecture().to_string(),
            variant: p.variant().clone().filter(|v| !v.is_empty()),
            os_version: p.os_version().clone().filter(|v| !v.is_empty()),
            os_features: p.os_features().clone().unwrap_or_default(),
        }
    }

    /// The normalised form as an `oci_spec` platform; `os.version` / `os.features` only when
    /// present.
    pub fn to_oci(&self) -> oci_spec::image::Platform {
        let n = self.normalized();
        let mut p = oci_spec::image::Platform::default();
        p.set_os(os_to_oci(&n.os));
        p.set_architecture(arch_to_oci(&n.architecture));
        p.set_variant(n.variant);
        p.set_os_version(n.os_version);
        p.set_os_features(if n.os_features.is_empty() {
            None
        } else {
            Some(n.os_features)
        });
        p
    }
}

/// `os/architecture[/variant]`; `os.version` and `os.features` are not shown.
impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_triple(f, &self.os, &self.architecture, self.variant.as_deref())
    }
}

// === impl PlatformKey ===

/// `os/architecture[/variant]`, e.g. `linux/arm64/v8`.
impl fmt::Display for PlatformKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_triple(f, &self.os, &self.architecture, self.variant.as_deref())
    }
}

fn write_triple(
    f: &mut fmt::Formatter<'_>,
    os: &str,
    arch: &str,
    variant: Option<&str>,
) -> fmt::Result {
    write!(f, "{os}/{arch}")?;
    if let Some(v) = variant {
        write!(f, "/{v}")?;
    }
    Ok(())
}

// === helpers ===

/// `[A-Za-z0-9_.-]+`, containerd's specifier alphabet.
fn is_specifier(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Architecture (already lowercase) and variant to GOARCH form, after containerd's
/// `normalizeArch`, with the `armhf` deviation documented on [`Platform::normalized`].
///
/// Two steps so that the result is a fixed point: first the architecture's spelling (some
/// spellings imply a variant), then the variant as that architecture spells it.
fn normalize_arch(arch: &str, variant: Option<String>) -> (String, Option<String>) {
    let implied = |v: &str| Some(v.to_owned());
    let (arch, variant) = match arch {
        "x86_64" | "x86-64" | "x64" => ("amd64", variant),
        "aarch64" | "arm64v8" => ("arm64", variant),
        "armhf" | "armel" => ("arm", variant.or_else(|| implied("v6"))),
        "armv7l" | "armv7" | "arm32v7" => ("arm", implied("v7")),
        "armv6l" | "armv6" | "arm32v6" => ("arm", implied("v6")),
        "armv5l" | "armv5" | "arm32v5" => ("arm", implied("v5")),
        "i386" | "i486" | "i586" | "i686" | "x86" => ("386", variant),
        "ppc64el" => ("ppc64le", variant),
        other => (other, variant),
    };
    let variant = match (arch, variant.as_deref()) {
        ("amd64", Some("v1" | "1")) | ("386", _) => None,
        ("arm64", None | Some("8" | "v8.0")) => implied("v8"),
        ("arm64", Some("9" | "9.0" | "v9.0")) => implied("v9"),
        ("arm", None | Some("7")) => implied("v7"),
        ("arm", Some(n @ ("5" | "6" | "8"))) => Some(format!("v{n}")),
        _ => variant,
    };
    (arch.to_owned(), variant)
}

/// `oci_spec`'s `Os::from` for the names it knows, `Other` for the rest, checked by round
/// trip so that no spelling is ever changed on the way out.
fn os_to_oci(os: &str) -> Os {
    match Os::from(os) {
        known if known.to_string() == os => known,
        _ => Os::Other(os.to_owned()),
    }
}

/// Same as [`os_to_oci`]; the round-trip check matters here: oci-spec 0.10 parses `armbe`
/// as `Arch::ARM64be`, which would print `arm64be`.
fn arch_to_oci(arch: &str) -> Arch {
    match Arch::from(arch) {
        known if known.to_string() == arch => known,
        _ => Arch::Other(arch.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rstest::rstest;

    fn p(s: &str) -> Platform {
        Platform::parse(s).unwrap()
    }

    #[rstest]
    #[case("linux/arm64/v8", "linux", "arm64", Some("v8"))]
    #[case("windows/amd64", "windows", "amd64", None)]
    #[case("linux/arm/v7", "linux", "arm", Some("v7"))]
    #[case("Linux/X86_64", "Linux", "X86_64", None)]
    fn parses(
        #[case] s: &str,
        #[case] os: &str,
        #[case] arch: &str,
        #[case] variant: Option<&str>,
    ) {
        assert_eq!(p(s), Platform::new(os, arch, variant));
    }

    #[rstest]
    #[case("", PlatformError::Empty)]
    #[case("linux", PlatformError::TooFewParts("linux".into()))]
    #[case("linux/arm/v7/x", PlatformError::TooManyParts("linux/arm/v7/x".into()))]
    #[case("linux//v7", PlatformError::EmptyPart("linux//v7".into()))]
    #[case("/amd64", PlatformError::EmptyPart("/amd64".into()))]
    #[case("linux/amd64/", PlatformError::EmptyPart("linux/amd64/".into()))]
    #[case("linux/am d64", PlatformError::InvalidPart { input: "linux/am d64".into(), part: "am d64".into() })]
    fn rejects(#[case] s: &str, #[case] err: PlatformError) {
        assert_eq!(Platform::parse(s), Err(err));
    }

    #[rstest]
    #[case("linux/x86_64", "linux/amd64")]
    #[case("linux/x86-64", "linux/amd64")]
    #[case("linux/amd64/v1", "linux/amd64")]
    #[case("linux/amd64/v3", "linux/amd64/v3")]
    #[case("linux/aarch64", "linux/arm64/v8")]
    #[case("linux/arm64", "linux/arm64/v8")]
    #[case("linux/arm64/8", "linux/arm64/v8")]
    #[case("linux/arm64/v8.0", "linux/arm64/v8")]
    #[case("linux/arm64/9.0", "linux/arm64/v9")]
    #[case("linux/arm", "linux/arm/v7")]
    #[case("linux/arm/6", "linux/arm/v6")]
    #[case("linux/arm/V5", "linux/arm/v5")]
    #[case("linux/armhf", "linux/arm/v6")]
    #[case("linux/armhf/v7", "linux/arm/v7")]
    #[case("linux/armel", "linux/arm/v6")]
    #[case("linux/armv7l", "linux/arm/v7")]
    #[case("linux/i386", "linux/386")]
    #[case("linux/i686", "linux/386")]
    #[case("linux/x86", "linux/386")]
    #[case("linux/ppc64el", "linux/ppc64le")]
    #[case("LINUX/AMD64", "linux/amd64")]
    #[case("windows/amd64", "windows/amd64")]
    #[case("linux/riscv64", "linux/riscv64")]
    #[case("linux/s390x", "linux/s390x")]
    fn normalises(#[case] input: &str, #[case] want: &str) {
        assert_eq!(p(input).normalized().to_string(), want);
        assert_eq!(p(input).key().to_string(), want);
    }

    #[test]
    fn normalised_keeps_os_details() {
        let mut pl = p("windows/x86_64");
        pl.os_version = Some("10.0.20348.2113".into());
        pl.os_features = vec!["win32k".into()];
        let n = pl.normalized();
        assert_eq!(n.os_version.as_deref(), Some("10.0.20348.2113"));
        assert_eq!(n.os_features, vec!["win32k".to_owned()]);
        assert_eq!(n.key(), p("windows/amd64").key());
    }

    #[test]
    fn to_oci_emits_normalised_form_and_details_only_when_present() {
        let o = p("linux/aarch64").to_oci();
        assert_eq!(o.os(), &Os::Linux);
        assert_eq!(o.architecture(), &Arch::ARM64);
        assert_eq!(o.variant().as_deref(), Some("v8"));
        assert_eq!(o.os_version(), &None);
        assert_eq!(o.os_features(), &None);

        let mut w = p("windows/amd64");
        w.os_version = Some("10.0.17763.5122".into());
        let o = w.to_oci();
        assert_eq!(o.os_version().as_deref(), Some("10.0.17763.5122"));
        assert_eq!(Platform::from_oci(&o), w);
    }

    #[test]
    fn to_oci_never_respells() {
        for s in [
            "linux/armbe",
            "unknown/unknown",
            "plan9/mips64p32le",
            "linux/loong64",
        ] {
            let pl = p(s);
            assert_eq!(Platform::from_oci(&pl.to_oci()), pl.normalized(), "{s}");
        }
    }

    proptest! {
        #[test]
        fn normalisation_is_idempotent(
            os in "[A-Za-z]{1,8}",
            arch in prop::sample::select(vec![
                "x86_64", "amd64", "aarch64", "arm64", "arm", "armhf", "armel", "armv7l", "i686",
                "386", "ppc64el", "riscv64", "AMD64", "weird",
            ]),
            variant in proptest::option::of("[vV]?[0-9](\\.[0-9])?"),
        ) {
            let pl = Platform::new(&os, arch, variant.as_deref());
            let once = pl.normalized();
            prop_assert_eq!(once.normalized(), once.clone());
            prop_assert_eq!(Platform::from_oci(&pl.to_oci()), once);
        }
    }
}
