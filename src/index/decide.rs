//! Which platform an entry gets (SPEC §2): the tag alias decides, as `docker manifest
//! annotate` does, and the image config adds `os.version`, `os.features` and a missing
//! variant; `platform_source = "config"` turns the priority around.
//!
//! Called by the merge engine for every image it lists. Pure: reporting a mismatch (log,
//! metric) is the caller's job.

use serde::{Deserialize, Serialize};

use super::ConfigPlatform;
use crate::platform::{Platform, PlatformKey};

/// Which side wins when tag alias and image config disagree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlatformSource {
    /// The tag alias (images cross-built on the wrong host often carry a wrong config).
    #[default]
    Alias,
    /// The image config; the alias only fills gaps.
    Config,
}

/// Alias and config name different platforms (both normalised).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// What the tag alias says.
    pub alias: PlatformKey,
    /// What the image config says, its missing fields filled from the alias.
    pub config: PlatformKey,
}

/// The platform of an image listed for an arch tag whose alias means `alias`, given the
/// platform fields of its config (`None` when the config could not be read), and whether the
/// two disagree.
///
/// Fields missing from the config are filled from the alias before comparing, so a config
/// without (say) a variant is never a mismatch by itself; nor is a variant the config names
/// where the alias names none (`amd64` vs `amd64/v3`). With [`PlatformSource::Alias`], the
/// config's variant is used only where the alias has none and the architectures agree (an
/// `arm64/v8` config does not turn an `amd64` alias into `amd64/v8`), and `os.version` /
/// `os.features` only where the operating systems agree. The result is normalised.
pub fn entry_platform(
    alias: &Platform,
    config: Option<&ConfigPlatform>,
    source: PlatformSource,
) -> (Platform, Option<Mismatch>) {
    let alias = alias.normalized();
    let Some(c) = config else {
        return (alias, None);
    };
    let os = c.os.as_deref().unwrap_or(&alias.os);
    let arch = c.architecture.as_deref().unwrap_or(&alias.architecture);
    // The config with its gaps filled: the alias's variant stands in for a missing one only
    // when the architectures agree; otherwise the config's architecture gets its own default.
    let filled =
        Platform::new(os, arch, c.variant.as_deref().or(alias.variant.as_deref())).normalized();
    let arch_agrees = filled.architecture == alias.architecture;
    let said = if arch_agrees {
        filled
    } else {
        Platform::new(os, arch, c.variant.as_deref()).normalized()
    };
    let os_agrees = said.os == alias.os;

    // A variant only the config names fills the alias's gap (amd64 → amd64/v3): no conflict.
    let variant_conflicts = alias.variant.is_some() && said.variant != alias.variant;
    let disagree = !os_agrees || !arch_agrees || variant_conflicts;
    let mismatch = disagree.then(|| Mismatch {
        alias: alias.key(),
        config: said.key(),
    });
    let details = (c.os_version.clone(), c.os_features.clone());
    let platform = match source {
        PlatformSource::Alias => {
            let variant = match (&alias.variant, arch_agrees) {
                (None, true) => said.variant,
                _ => alias.variant.clone(),
            };
            let (os_version, os_features) = if os_agrees {
                details
            } else {
                (alias.os_version.clone(), alias.os_features.clone())
            };
            Platform {
                variant,
                os_version,
                os_features,
                ..alias
            }
        }
        PlatformSource::Config => Platform {
            os_version: details.0,
            os_features: details.1,
            ..said
        },
    };
    (platform.normalized(), mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn config(os: Option<&str>, arch: Option<&str>, variant: Option<&str>) -> ConfigPlatform {
        ConfigPlatform {
            os: os.map(str::to_owned),
            architecture: arch.map(str::to_owned),
            variant: variant.map(str::to_owned),
            os_version: None,
            os_features: Vec::new(),
        }
    }

    fn p(s: &str) -> Platform {
        Platform::parse(s).unwrap()
    }

    #[rstest]
    // Agreement, in any spelling.
    #[case("linux/amd64", (Some("linux"), Some("amd64"), None), PlatformSource::Alias, "linux/amd64", None)]
    #[case("linux/arm64/v8", (Some("linux"), Some("arm64"), None), PlatformSource::Alias, "linux/arm64/v8", None)]
    #[case("linux/arm64/v8", (Some("linux"), Some("aarch64"), Some("v8")), PlatformSource::Config, "linux/arm64/v8", None)]
    // Missing fields are not a mismatch; an armhf (v6) alias is not contradicted by a bare `arm`.
    #[case("linux/arm/v6", (None, Some("arm"), None), PlatformSource::Alias, "linux/arm/v6", None)]
    #[case("linux/arm/v6", (None, None, None), PlatformSource::Config, "linux/arm/v6", None)]
    // The config's variant where the alias has none.
    #[case("linux/amd64", (Some("linux"), Some("amd64"), Some("v3")), PlatformSource::Alias, "linux/amd64/v3", None)]
    #[case("linux/amd64", (Some("linux"), Some("amd64"), Some("v1")), PlatformSource::Alias, "linux/amd64", None)]
    // Cross-built on the wrong host: the alias wins by default, the config on request.
    #[case("linux/arm64/v8", (Some("linux"), Some("amd64"), None), PlatformSource::Alias, "linux/arm64/v8", Some("linux/amd64"))]
    #[case("linux/arm64/v8", (Some("linux"), Some("amd64"), None), PlatformSource::Config, "linux/amd64", Some("linux/amd64"))]
    #[case("linux/amd64", (Some("linux"), Some("arm64"), Some("v8")), PlatformSource::Alias, "linux/amd64", Some("linux/arm64/v8"))]
    #[case("linux/arm/v6", (Some("linux"), Some("arm"), Some("v7")), PlatformSource::Alias, "linux/arm/v6", Some("linux/arm/v7"))]
    #[case("linux/arm/v6", (Some("linux"), Some("arm"), Some("v7")), PlatformSource::Config, "linux/arm/v7", Some("linux/arm/v7"))]
    #[case("linux/arm/v6", (Some("linux"), Some("arm64"), None), PlatformSource::Config, "linux/arm64/v8", Some("linux/arm64/v8"))]
    fn decides(
        #[case] alias: &str,
        #[case] cfg: (Option<&str>, Option<&str>, Option<&str>),
        #[case] source: PlatformSource,
        #[case] want: &str,
        #[case] mismatch: Option<&str>,
    ) {
        let (got, m) = entry_platform(&p(alias), Some(&config(cfg.0, cfg.1, cfg.2)), source);
        assert_eq!(got.to_string(), want);
        assert_eq!(
            m.as_ref().map(|m| m.config.to_string()).as_deref(),
            mismatch
        );
        if let Some(m) = m {
            assert_eq!(m.alias, p(alias).key());
        }
    }

    #[test]
    fn os_details_come_from_the_config() {
        let mut c = config(Some("windows"), Some("amd64"), None);
        c.os_version = Some("10.0.20348.2113".into());
        c.os_features = vec!["win32k".into()];
        let (got, m) = entry_platform(&p("windows/amd64"), Some(&c), PlatformSource::Alias);
        assert_eq!(m, None);
        assert_eq!(got.os_version.as_deref(), Some("10.0.20348.2113"));
        assert_eq!(got.os_features, ["win32k"]);

        // A linux alias does not take a windows config's os.version.
        let (got, m) = entry_platform(&p("linux/amd64"), Some(&c), PlatformSource::Alias);
        assert_eq!(got, p("linux/amd64"));
        assert_eq!(m.unwrap().config.to_string(), "windows/amd64");
    }

    #[test]
    fn without_a_config_the_alias_decides() {
        let (got, m) = entry_platform(&p("linux/aarch64"), None, PlatformSource::Config);
        assert_eq!(got.to_string(), "linux/arm64/v8");
        assert_eq!(m, None);
    }
}
