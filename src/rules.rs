//! Which tags merge (SPEC §1): the arch alias table, tag patterns, and the matcher that turns
//! a pushed tag such as `aarch64_v1.2` into an [`ArchTag`] (arch `aarch64`, platform
//! `linux/arm64/v8`, target `v1.2`).
//!
//! Called by the intercept path (is this PUT an arch tag?), by the merge engine (which arch
//! tags of a repository feed this target?) and by config loading (aliases and patterns from
//! TOML are validated here).
//!
//! Pure: no I/O, no logging. Per-repository rule selection, allow-lists and required sets are
//! the caller's business; this module only answers "does this tag name match, and how".

use std::collections::BTreeMap;
use std::fmt;

use crate::oci::is_valid_tag;
use crate::platform::{Platform, PlatformError};

/// Default alias table of SPEC §1: (aliases, platform).
const DEFAULT_ALIASES: &[(&[&str], &str)] = &[
    (&["x86_64", "x86-64", "amd64", "x64"], "linux/amd64"),
    (&["aarch64", "arm64", "arm64v8"], "linux/arm64/v8"),
    (&["armv7l", "armv7", "arm32v7"], "linux/arm/v7"),
    (
        &["armhf", "armv6l", "armv6", "arm32v6", "armel"],
        "linux/arm/v6",
    ),
    (&["i386", "i686", "386", "x86"], "linux/386"),
    (&["ppc64le", "ppc64el"], "linux/ppc64le"),
    (&["s390x"], "linux/s390x"),
    (&["riscv64"], "linux/riscv64"),
    (&["mips64le"], "linux/mips64le"),
    (&["loong64"], "linux/loong64"),
];

/// Default patterns: the classic `make annotate` naming, `repo:aarch64_v1.2` and `repo:aarch64`.
const DEFAULT_PATTERNS: &[&str] = &["{arch}_{tag}", "{arch}"];

/// The target of a pattern without `{tag}`.
const DEFAULT_TARGET: &str = "latest";

/// A rule that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// An alias name is empty or has characters a tag cannot hold.
    #[error("arch alias `{0}` must be 1-128 of [A-Za-z0-9_.-]")]
    InvalidAlias(String),
    /// An alias maps to something that is not a platform string.
    #[error("arch alias `{alias}`: {source}")]
    AliasPlatform {
        /// The alias.
        alias: String,
        /// Why its platform did not parse.
        source: PlatformError,
    },
    /// A pattern without `{arch}`.
    #[error("tag pattern `{0}` must contain `{{arch}}`")]
    MissingArch(String),
    /// `{arch}` or `{tag}` more than once.
    #[error("tag pattern `{pattern}` has `{placeholder}` more than once")]
    DuplicatePlaceholder {
        /// The pattern.
        pattern: String,
        /// The repeated placeholder.
        placeholder: String,
    },
    /// `{repo}`: reserved for repository patterns (`{repo}-{arch}:{tag}`), not supported here.
    #[error("tag pattern `{pattern}`: `{placeholder}` is not a tag placeholder (repository patterns are not supported; use {{arch}} and {{tag}})")]
    NotATagPlaceholder {
        /// The pattern.
        pattern: String,
        /// The placeholder.
        placeholder: String,
    },
    /// A `{…}` that means nothing.
    #[error("tag pattern `{pattern}`: unknown placeholder `{placeholder}` (use {{arch}} and {{tag}})")]
    UnknownPlaceholder {
        /// The pattern.
        pattern: String,
        /// The placeholder.
        placeholder: String,
    },
    /// Two placeholders with nothing between them: `{arch}{tag}` cannot be split.
    #[error("tag pattern `{0}`: placeholders must be separated by literal text")]
    AdjacentPlaceholders(String),
    /// A lone `{` or `}`.
    #[error("tag pattern `{0}` has an unbalanced brace")]
    UnbalancedBrace(String),
    /// Literal text a tag cannot contain (`:` or `/`, say).
    #[error("tag pattern `{pattern}`: `{literal}` has characters a tag cannot hold")]
    InvalidLiteral {
        /// The pattern.
        pattern: String,
        /// The literal text.
        literal: String,
    },
}

// === impl AliasTable ===

/// Arch aliases (the `{arch}` part of a tag) and the platform each stands for.
///
/// Platforms are stored normalised, so the table emits one form whatever spelling the config
/// used (`windows/x86_64` is kept as `windows/amd64`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AliasTable {
    /// Sorted longest alias first, then by name: the matcher's preference order, kept sorted
    /// so that it is computed once, not per tag.
    entries: Vec<(String, Platform)>,
}

impl AliasTable {
    /// The table of SPEC §1.
    pub fn default_table() -> AliasTable {
        let mut table = AliasTable {
            entries: Vec::new(),
        };
        for (aliases, platform) in DEFAULT_ALIASES {
            for alias in *aliases {
                table
                    .insert(alias, platform)
                    .expect("the default alias table is valid");
            }
        }
        table
    }

    /// The default table with `overrides` (alias → platform string such as `windows/amd64`)
    /// added or replacing defaults. Fails on the first bad entry in key order; use
    /// [`AliasTable::insert`] to collect every error.
    pub fn with_overrides(overrides: &BTreeMap<String, String>) -> Result<AliasTable, RuleError> {
        let mut table = AliasTable::default_table();
        for (alias, platform) in overrides {
            table.insert(alias, platform)?;
        }
        Ok(table)
    }

    /// Adds or replaces one alias.
    pub fn insert(&mut self, alias: &str, platform: &str) -> Result<(), RuleError> {
        if !is_alias_name(alias) {
            return Err(RuleError::InvalidAlias(alias.to_owned()));
        }
        let platform = Platform::parse(platform)
            .map_err(|source| RuleError::AliasPlatform {
                alias: alias.to_owned(),
                source,
            })?
            .normalized();
        self.entries.retain(|(a, _)| a != alias);
        self.entries.push((alias.to_owned(), platform));
        self.entries
            .sort_by(|(a, _), (b, _)| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        Ok(())
    }

    /// The platform of an alias (case-sensitive, as in the table).
    pub fn lookup(&self, alias: &str) -> Option<&Platform> {
        self.entries
            .iter()
            .find(|(a, _)| a == alias)
            .map(|(_, p)| p)
    }

    /// Every alias with its platform, longest alias first (ties by name).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Platform)> {
        self.entries.iter().map(|(a, p)| (a.as_str(), p))
    }
}

impl Default for AliasTable {
    fn default() -> Self {
        AliasTable::default_table()
    }
}

// === impl Pattern ===

/// One piece of a [`Pattern`].
#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Arch,
    Tag,
}

/// A tag template over `{arch}` and `{tag}` with literal text between them, e.g.
/// `{arch}_{tag}`, `{arch}`, `{tag}-{arch}`, `{arch}-{tag}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    /// The text as configured, for logs and errors.
    source: String,
    /// The pattern split into literal text and placeholders.
    segments: Vec<Segment>,
}

impl Pattern {
    /// Parses and validates a pattern: `{arch}` exactly once, `{tag}` at most once, a literal
    /// between two placeholders, literal text made of tag characters.
    pub fn parse(s: &str) -> Result<Pattern, RuleError> {
        let mut segments = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            match (rest.find('{'), rest.find('}')) {
                (Some(0), close) => {
                    let close = close.ok_or_else(|| RuleError::UnbalancedBrace(s.to_owned()))?;
                    let name = &rest[..=close];
                    if name[1..].contains('{') {
                        return Err(RuleError::UnbalancedBrace(s.to_owned()));
                    }
                    let segment = match name {
                        "{arch}" => Segment::Arch,
                        "{tag}" => Segment::Tag,
                        "{repo}" => {
                            return Err(RuleError::NotATagPlaceholder {
                                pattern: s.to_owned(),
                                placeholder: name.to_owned(),
                            })
                        }
                        _ => {
                            return Err(RuleError::UnknownPlaceholder {
                                pattern: s.to_owned(),
                                placeholder: name.to_owned(),
                            })
                        }
                    };
                    if segments.contains(&segment) {
                        return Err(RuleError::DuplicatePlaceholder {
                            pattern: s.to_owned(),
                            placeholder: name.to_owned(),
                        });
                    }
                    if matches!(segments.last(), Some(Segment::Arch | Segment::Tag)) {
                        return Err(RuleError::AdjacentPlaceholders(s.to_owned()));
                    }
                    segments.push(segment);
                    rest = &rest[close + 1..];
                }
                (open, close) => {
                    let end = open.unwrap_or(rest.len());
                    if close.is_some_and(|c| c < end) {
                        return Err(RuleError::UnbalancedBrace(s.to_owned()));
                    }
                    let literal = &rest[..end];
                    if !literal.bytes().all(is_tag_byte) {
                        return Err(RuleError::InvalidLiteral {
                            pattern: s.to_owned(),
                            literal: literal.to_owned(),
                        });
                    }
                    segments.push(Segment::Literal(literal.to_owned()));
                    rest = &rest[end..];
                }
            }
        }
        if !segments.contains(&Segment::Arch) {
            return Err(RuleError::MissingArch(s.to_owned()));
        }
        Ok(Pattern {
            source: s.to_owned(),
            segments,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the pattern has `{tag}` (otherwise its target is `latest`).
    pub fn has_tag(&self) -> bool {
        self.segments.contains(&Segment::Tag)
    }

    /// Matches `tag` with `{arch}` = `alias`: the target when the whole tag matches.
    ///
    /// Once `{arch}` is fixed there is at most one free placeholder, so the match is a prefix
    /// and suffix test: no backtracking, no regex.
    fn match_alias<'t>(&self, tag: &'t str, alias: &str) -> Option<&'t str> {
        let mut prefix = String::new();
        let mut suffix = String::new();
        let mut seen_tag = false;
        for segment in &self.segments {
            let text = match segment {
                Segment::Literal(l) => l.as_str(),
                Segment::Arch => alias,
                Segment::Tag => {
                    seen_tag = true;
                    continue;
                }
            };
            let side = if seen_tag { &mut suffix } else { &mut prefix };
            side.push_str(text);
        }
        if !seen_tag {
            return (tag == prefix).then_some(DEFAULT_TARGET);
        }
        if tag.len() <= prefix.len() + suffix.len() {
            return None;
        }
        tag.strip_prefix(prefix.as_str())?
            .strip_suffix(suffix.as_str())
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

// === impl TagRules ===

/// A tag that matched a pattern: what was pushed, and where its index lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchTag {
    /// The pushed tag, e.g. `aarch64_v1.2`.
    pub tag: String,
    /// The alias that matched `{arch}`, e.g. `aarch64`.
    pub alias: String,
    /// The alias's (normalised) platform.
    pub platform: Platform,
    /// The tag the index lives at, e.g. `v1.2` (`latest` for a pattern without `{tag}`).
    pub target: String,
}

/// Aliases and patterns: the whole answer to "is this an arch tag".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagRules {
    /// The alias table `{arch}` draws from.
    pub aliases: AliasTable,
    /// Patterns in preference order (the earlier wins a tie).
    pub patterns: Vec<Pattern>,
}

impl Default for TagRules {
    /// The default table and the patterns `{arch}_{tag}`, `{arch}`.
    fn default() -> Self {
        let patterns = DEFAULT_PATTERNS
            .iter()
            .map(|p| Pattern::parse(p).expect("default patterns are valid"))
            .collect();
        TagRules::new(AliasTable::default_table(), patterns)
    }
}

impl TagRules {
    /// Rules from a table and patterns (earlier patterns win ties).
    pub fn new(aliases: AliasTable, patterns: Vec<Pattern>) -> TagRules {
        TagRules { aliases, patterns }
    }

    /// Matches a tag: the longest alias wins, ties go to the earlier pattern.
    ///
    /// Never a match: a tag that is not a valid tag, a referrers fallback tag
    /// (`sha256-<hex>`), and a tag whose target would itself be a referrers tag or an arch
    /// tag (see [`TagRules::candidate`] for why).
    pub fn match_tag(&self, tag: &str) -> Option<ArchTag> {
        let m = self.candidate(tag)?;
        // An index written at an arch-tag-shaped target (`aarch64_x86_64` → `x86_64`) would be
        // read back as an arch child of another target (`latest`), nesting indexes and making
        // the two targets feed each other. "Arch-tag-shaped" is the structural test, not
        // `match_tag` itself: that keeps the rule non-recursive (no alternation between
        // `a_a`, `a_a_a`, …) and guarantees `!is_arch_tag(m.target)` for every match.
        // A referrers fallback tag as target would overwrite the registry's referrers list.
        if self.candidate(&m.target).is_some() || is_referrers_tag(&m.target) {
            return None;
        }
        Some(m)
    }

    /// Whether `tag` is an arch tag.
    pub fn is_arch_tag(&self, tag: &str) -> bool {
        self.match_tag(tag).is_some()
    }

    /// The arch tags among `tags` that feed `target`, sorted by tag name so that every replica
    /// builds from the same list in the same order.
    pub fn arch_tags_for_target<'a>(
        &self,
        tags: impl IntoIterator<Item = &'a str>,
        target: &str,
    ) -> Vec<ArchTag> {
        let mut out: Vec<ArchTag> = tags
            .into_iter()
            .filter_map(|t| self.match_tag(t))
            .filter(|m| m.target == target)
            .collect();
        out.sort_by(|a, b| a.tag.cmp(&b.tag));
        out.dedup_by(|a, b| a.tag == b.tag);
        out
    }

    /// The structural match, before the "target must not be an arch tag" rule: the best
    /// (longest alias, then earliest pattern) combination whose `{tag}` part is a valid tag.
    fn candidate(&self, tag: &str) -> Option<ArchTag> {
        if !is_valid_tag(tag) || is_referrers_tag(tag) {
            return None;
        }
        // Preference: longest alias, then earliest pattern, then alias name (only to make
        // the choice total). A full scan: a few dozen prefix/suffix tests per tag.
        let mut best: Option<((std::cmp::Reverse<usize>, usize), &str, &Platform, &str)> = None;
        for (alias, platform) in self.aliases.iter() {
            for (rank, pattern) in self.patterns.iter().enumerate() {
                let Some(target) = pattern.match_alias(tag, alias) else {
                    continue;
                };
                let order = (std::cmp::Reverse(alias.len()), rank);
                let better = match &best {
                    None => true,
                    Some((o, ..)) => order < *o,
                };
                if better && is_valid_tag(target) {
                    best = Some((order, alias, platform, target));
                }
            }
        }
        best.map(|(_, alias, platform, target)| ArchTag {
            tag: tag.to_owned(),
            alias: alias.to_owned(),
            platform: platform.clone(),
            target: target.to_owned(),
        })
    }
}

// === helpers ===

fn is_tag_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

/// An alias is at most a whole tag of tag characters.
fn is_alias_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(is_tag_byte)
}

/// A referrers fallback tag (`<alg>-<ref>`, OCI distribution 1.1, the digest's encoded part
/// truncated to 64 characters): `[a-z0-9]+-[0-9a-f]{64}`.
pub fn is_referrers_tag(s: &str) -> bool {
    let Some((alg, hex)) = s.split_once('-') else {
        return false;
    };
    !alg.is_empty()
        && alg.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && hex.len() == 64
        && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rstest::rstest;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn rules(patterns: &[&str]) -> TagRules {
        let patterns = patterns.iter().map(|p| Pattern::parse(p).unwrap()).collect();
        TagRules::new(AliasTable::default_table(), patterns)
    }

    fn windows_rules() -> TagRules {
        let overrides = BTreeMap::from([("windows-amd64".to_owned(), "windows/amd64".to_owned())]);
        let aliases = AliasTable::with_overrides(&overrides).unwrap();
        let patterns = ["{tag}-{arch}", "{arch}"].map(|p| Pattern::parse(p).unwrap());
        TagRules::new(aliases, patterns.into())
    }

    #[rstest]
    // SPEC §1 examples, default patterns.
    #[case("aarch64_v1.2", Some(("aarch64", "v1.2", "linux/arm64/v8")))]
    #[case("aarch64", Some(("aarch64", "latest", "linux/arm64/v8")))]
    #[case("x86_64_v1", Some(("x86_64", "v1", "linux/amd64")))]
    #[case("x86_64", Some(("x86_64", "latest", "linux/amd64")))]
    #[case("x86_64_v1.2", Some(("x86_64", "v1.2", "linux/amd64")))]
    #[case("v1_2", None)]
    #[case("v1.2", None)]
    #[case("latest", None)]
    // Every row of the table.
    #[case("x86-64_1.0", Some(("x86-64", "1.0", "linux/amd64")))]
    #[case("amd64_1.0", Some(("amd64", "1.0", "linux/amd64")))]
    #[case("x64_1.0", Some(("x64", "1.0", "linux/amd64")))]
    #[case("arm64_1.0", Some(("arm64", "1.0", "linux/arm64/v8")))]
    #[case("arm64v8_1.0", Some(("arm64v8", "1.0", "linux/arm64/v8")))]
    #[case("armv7l_1.0", Some(("armv7l", "1.0", "linux/arm/v7")))]
    #[case("armv7_1.0", Some(("armv7", "1.0", "linux/arm/v7")))]
    #[case("arm32v7_1.0", Some(("arm32v7", "1.0", "linux/arm/v7")))]
    #[case("armhf", Some(("armhf", "latest", "linux/arm/v6")))]
    #[case("armv6l_1.0", Some(("armv6l", "1.0", "linux/arm/v6")))]
    #[case("armv6_1.0", Some(("armv6", "1.0", "linux/arm/v6")))]
    #[case("arm32v6_1.0", Some(("arm32v6", "1.0", "linux/arm/v6")))]
    #[case("armel_1.0", Some(("armel", "1.0", "linux/arm/v6")))]
    #[case("i386_1.0", Some(("i386", "1.0", "linux/386")))]
    #[case("i686_1.0", Some(("i686", "1.0", "linux/386")))]
    #[case("386_1.0", Some(("386", "1.0", "linux/386")))]
    #[case("x86_1.0", Some(("x86", "1.0", "linux/386")))]
    #[case("ppc64le_1.0", Some(("ppc64le", "1.0", "linux/ppc64le")))]
    #[case("ppc64el_1.0", Some(("ppc64el", "1.0", "linux/ppc64le")))]
    #[case("s390x_1.0", Some(("s390x", "1.0", "linux/s390x")))]
    #[case("riscv64_1.0", Some(("riscv64", "1.0", "linux/riscv64")))]
    #[case("mips64le_1.0", Some(("mips64le", "1.0", "linux/mips64le")))]
    #[case("loong64_1.0", Some(("loong64", "1.0", "linux/loong64")))]
    // Edge cases.
    #[case("x86_64_", None)] // empty {tag}
    #[case("aarch64_.hidden", None)] // {tag} must start with [A-Za-z0-9_]
    #[case("aarch64__x", Some(("aarch64", "_x", "linux/arm64/v8")))]
    #[case("AARCH64_v1", None)] // aliases are case-sensitive
    #[case("aarch64-v1", None)] // not a default pattern
    #[case("aarch64_x86_64", None)] // target would be an arch tag
    #[case("aarch64_aarch64_v1", None)] // ditto
    #[case("aarch64_aarch64_aarch64", None)] // structural test: no alternation
    #[case("x86_64_x86", None)] // longest alias decides, its target is an arch tag
    #[case("aarch64_sha256-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", None)]
    #[case("sha256-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", None)]
    #[case("aarch64/v1", None)] // not a tag at all
    #[case("", None)]
    fn default_rules(#[case] tag: &str, #[case] want: Option<(&str, &str, &str)>) {
        let got = TagRules::default().match_tag(tag);
        let got = got
            .as_ref()
            .map(|m| (m.alias.as_str(), m.target.as_str(), m.platform.to_string()));
        let want = want.map(|(a, t, p)| (a, t, p.to_owned()));
        assert_eq!(got, want, "{tag}");
    }

    #[rstest]
    #[case(&["{tag}-{arch}"], "v1.2-arm64", Some(("arm64", "v1.2")))]
    #[case(&["{tag}-{arch}"], "v1.2-x86_64", Some(("x86_64", "v1.2")))]
    #[case(&["{tag}-{arch}"], "1.0-x86-64", Some(("x86-64", "1.0")))]
    #[case(&["{arch}-{tag}"], "arm64v8-latest", Some(("arm64v8", "latest")))]
    #[case(&["{arch}-{tag}"], "arm32v7-1.0", Some(("arm32v7", "1.0")))]
    #[case(&["{arch}-{tag}"], "x86-64-1.0", Some(("x86-64", "1.0")))]
    #[case(&["{arch}-{tag}"], "x86-1.0", Some(("x86", "1.0")))]
    #[case(&["{arch}-{tag}", "{tag}-{arch}"], "amd64-arm64", Some(("amd64", "arm64")))]
    #[case(&["{tag}-{arch}", "{arch}-{tag}"], "amd64-arm64", Some(("arm64", "amd64")))] // tie: earlier pattern
    #[case(&["{arch}-{tag}", "{tag}-{arch}"], "armhf-x86-64", Some(("x86-64", "armhf")))] // longest alias
    #[case(&["{arch}_{tag}", "{tag}_{arch}"], "v1_arm64", Some(("arm64", "v1")))]
    #[case(&["{arch}"], "arm64_v1", None)]
    #[case(&["build-{arch}-{tag}-final"], "build-arm64-7-final", Some(("arm64", "7")))]
    #[case(&["build-{arch}-{tag}-final"], "build-arm64--final", None)]
    #[case(&["{arch}.img"], "s390x.img", Some(("s390x", "latest")))]
    fn custom_patterns(
        #[case] patterns: &[&str],
        #[case] tag: &str,
        #[case] want: Option<(&str, &str)>,
    ) {
        let got = rules(patterns).match_tag(tag);
        let got = got.as_ref().map(|m| (m.alias.as_str(), m.target.as_str()));
        assert_eq!(got, want, "{tag}");
    }

    #[test]
    fn an_alias_may_name_an_os() {
        let m = windows_rules().match_tag("v1.0-windows-amd64").unwrap();
        assert_eq!(m.alias, "windows-amd64");
        assert_eq!(m.target, "v1.0");
        assert_eq!(m.platform.to_string(), "windows/amd64");
        assert_eq!(windows_rules().match_tag("v1.0-amd64").unwrap().alias, "amd64");
    }

    #[rstest]
    #[case("", RuleError::MissingArch(String::new()))]
    #[case("{tag}", RuleError::MissingArch("{tag}".into()))]
    #[case("v-{tag}", RuleError::MissingArch("v-{tag}".into()))]
    #[case("{arch}{tag}", RuleError::AdjacentPlaceholders("{arch}{tag}".into()))]
    #[case("{arch}_{arch}", RuleError::DuplicatePlaceholder { pattern: "{arch}_{arch}".into(), placeholder: "{arch}".into() })]
    #[case("{arch}_{tag}_{tag}", RuleError::DuplicatePlaceholder { pattern: "{arch}_{tag}_{tag}".into(), placeholder: "{tag}".into() })]
    #[case("{repo}-{arch}", RuleError::NotATagPlaceholder { pattern: "{repo}-{arch}".into(), placeholder: "{repo}".into() })]
    #[case("{arch}_{version}", RuleError::UnknownPlaceholder { pattern: "{arch}_{version}".into(), placeholder: "{version}".into() })]
    #[case("{arch", RuleError::UnbalancedBrace("{arch".into()))]
    #[case("arch}_{tag}", RuleError::UnbalancedBrace("arch}_{tag}".into()))]
    #[case("{ar{arch}", RuleError::UnbalancedBrace("{ar{arch}".into()))]
    #[case("{arch}:{tag}", RuleError::InvalidLiteral { pattern: "{arch}:{tag}".into(), literal: ":".into() })]
    fn bad_patterns(#[case] pattern: &str, #[case] err: RuleError) {
        assert_eq!(Pattern::parse(pattern), Err(err));
    }

    #[test]
    fn repo_placeholder_error_says_why() {
        let err = Pattern::parse("{repo}-{arch}").unwrap_err().to_string();
        assert!(err.contains("not a tag placeholder"), "{err}");
    }

    #[test]
    fn pattern_without_tag_targets_latest() {
        let p = Pattern::parse("{arch}").unwrap();
        assert!(!p.has_tag());
        assert_eq!(p.as_str(), "{arch}");
        assert!(Pattern::parse("{tag}-{arch}").unwrap().has_tag());
    }

    #[rstest]
    #[case("windows-amd64", "windows/amd64", Ok("windows/amd64"))]
    #[case("x86_64", "linux/386", Ok("linux/386"))] // replaces a default
    #[case("pi", "linux/armhf", Ok("linux/arm/v6"))] // stored normalised
    #[case("", "linux/amd64", Err(RuleError::InvalidAlias(String::new())))]
    #[case("a:b", "linux/amd64", Err(RuleError::InvalidAlias("a:b".into())))]
    #[case("win", "windows", Err(RuleError::AliasPlatform { alias: "win".into(), source: PlatformError::TooFewParts("windows".into()) }))]
    fn overrides(#[case] alias: &str, #[case] platform: &str, #[case] want: Result<&str, RuleError>) {
        let map = BTreeMap::from([(alias.to_owned(), platform.to_owned())]);
        let got = AliasTable::with_overrides(&map)
            .map(|t| t.lookup(alias).map(ToString::to_string).unwrap());
        assert_eq!(got, want.map(str::to_owned));
    }

    #[test]
    fn table_iterates_longest_first() {
        let table = AliasTable::default_table();
        let lens: Vec<usize> = table.iter().map(|(a, _)| a.len()).collect();
        assert!(lens.windows(2).all(|w| w[0] >= w[1]), "{lens:?}");
        assert_eq!(table.iter().count(), 25);
        assert_eq!(table.lookup("arm64v8").unwrap().to_string(), "linux/arm64/v8");
        assert!(table.lookup("ARM64").is_none());
    }

    #[test]
    fn arch_tags_for_target_sorted_and_filtered() {
        let tags = [
            "x86_64_v1", "v1", "aarch64_v1", "aarch64_v2", "armhf_v1", "aarch64", "x86_64_v1",
        ];
        let got: Vec<String> = TagRules::default()
            .arch_tags_for_target(tags, "v1")
            .into_iter()
            .map(|m| m.tag)
            .collect();
        assert_eq!(got, ["aarch64_v1", "armhf_v1", "x86_64_v1"]);
        let latest = TagRules::default().arch_tags_for_target(tags, "latest");
        assert_eq!(latest.len(), 1);
        assert!(TagRules::default().is_arch_tag("aarch64"));
        assert!(!TagRules::default().is_arch_tag("v1"));
    }

    #[rstest]
    #[case(&format!("sha256-{HEX}"), true)]
    #[case(&format!("sha512-{HEX}"), true)]
    #[case(&format!("sha256-{}", &HEX[1..]), false)]
    #[case(&format!("sha256-{}", HEX.to_uppercase()), false)]
    #[case("sha256-abc", false)]
    fn referrers_tags(#[case] tag: &str, #[case] want: bool) {
        assert_eq!(is_referrers_tag(tag), want);
    }

    proptest! {
        #[test]
        fn match_tag_never_panics(tag in ".{0,140}") {
            let _ = TagRules::default().match_tag(&tag);
            let _ = windows_rules().match_tag(&tag);
        }

        #[test]
        fn a_match_targets_a_valid_non_arch_tag(
            alias in prop::sample::select(vec!["x86_64", "x86", "aarch64", "arm64", "armhf", "386"]),
            rest in "[A-Za-z0-9_.-]{0,20}",
            before in any::<bool>(),
        ) {
            let r = TagRules::default();
            let tag = if before { format!("{alias}_{rest}") } else { format!("{rest}{alias}") };
            if let Some(m) = r.match_tag(&tag) {
                prop_assert!(is_valid_tag(&m.target), "{:?}", m);
                prop_assert!(!r.is_arch_tag(&m.target), "{:?}", m);
                prop_assert_eq!(m.tag, tag);
            }
        }
    }
}
