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
pub(crate) const DEFAULT_PATTERNS: &[&str] = &["{arch}_{tag}", "{arch}"];

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
    #[error(
        "tag pattern `{pattern}`: unknown placeholder `{placeholder}` (use {{arch}} and {{tag}})"
    )]
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

impl Segment {
    /// The text this segment stands for, with `{arch}` = `alias` (`{tag}`
    /// never asks: it is what is left).
    fn text<'a>(&'a self, alias: &'a str) -> &'a str {
        match self {
            Segment::Literal(l) => l,
            Segment::Arch | Segment::Tag => alias,
        }
    }
}

/// A tag template over `{arch}` and `{tag}` with literal text between them, e.g.
/// `{arch}_{tag}`, `{arch}`, `{tag}-{arch}`, `{arch}-{tag}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    /// The text as configured, for logs and errors.
    source: String,
    /// The pattern split into literal text and placeholders.
    segments: Vec<Segment>,
    /// Where `{tag}` is among `segments`, if it is there.
    tag_at: Option<usize>,
    /// Bytes of literal text: every tag the pattern fits is longer than
    /// that by its alias, and by its target when it has `{tag}`.
    literal_len: usize,
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
        let literal_len = segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => l.len(),
                Segment::Arch | Segment::Tag => 0,
            })
            .sum();
        Ok(Pattern {
            source: s.to_owned(),
            tag_at: segments.iter().position(|s| *s == Segment::Tag),
            segments,
            literal_len,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The tag this pattern makes of `alias` and `target`: `None` for a
    /// pattern without `{tag}` unless `target` is `latest`.
    pub fn render(&self, alias: &str, target: &str) -> Option<String> {
        if !self.has_tag() && target != DEFAULT_TARGET {
            return None;
        }
        Some(
            self.segments
                .iter()
                .map(|s| match s {
                    Segment::Literal(l) => l.as_str(),
                    Segment::Arch => alias,
                    Segment::Tag => target,
                })
                .collect(),
        )
    }

    /// Whether the pattern has `{tag}` (otherwise its target is `latest`).
    pub fn has_tag(&self) -> bool {
        self.tag_at.is_some()
    }

    /// Fits `tag` to the pattern with `{arch}` = `alias`: the text left for `{tag}` (possibly
    /// empty, not yet validated), or `latest` for a pattern without `{tag}`.
    ///
    /// Once `{arch}` is fixed there is at most one free placeholder, so the match is a prefix
    /// and suffix test: no backtracking, no regex.
    fn match_alias<'t>(&self, tag: &'t str, alias: &str) -> Option<&'t str> {
        // Called for every (alias, pattern) pair of every tag a repository
        // lists and of every tag served: most pairs are ruled out by the
        // tag's length alone; the rest strips the segments off both ends,
        // allocating nothing.
        let fixed = self.literal_len + alias.len();
        let fits = match self.tag_at {
            Some(_) => tag.len() >= fixed,
            None => tag.len() == fixed,
        };
        if !fits {
            return None;
        }
        let (before, after) = self
            .segments
            .split_at(self.tag_at.unwrap_or(self.segments.len()));
        let mut rest = tag;
        for segment in before {
            rest = rest.strip_prefix(segment.text(alias))?;
        }
        if self.tag_at.is_none() {
            return rest.is_empty().then_some(DEFAULT_TARGET);
        }
        for segment in after[1..].iter().rev() {
            rest = rest.strip_suffix(segment.text(alias))?;
        }
        Some(rest)
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

    /// Matches a tag: the longest alias that fits wins, ties go to the earlier pattern, and
    /// the rest must be a valid tag (no fallback to a shorter alias: `x86_64_` is no match).
    ///
    /// Never a match: a tag that is not a valid tag, a referrers fallback tag
    /// (`sha256-<hex>`), and a tag whose target would itself be a referrers tag or look like
    /// an arch tag (an index written there would be read back as an arch child).
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
        // A tag feeds `target` only with `target` inside it, or through a
        // pattern without `{tag}` (target `latest`): a cheap first cut over
        // a listing of thousands of tags.
        let any = target == DEFAULT_TARGET;
        let mut out: Vec<ArchTag> = tags
            .into_iter()
            .filter(|t| any || t.contains(target))
            .filter_map(|t| self.match_tag(t))
            .filter(|m| m.target == target)
            .collect();
        out.sort_by(|a, b| a.tag.cmp(&b.tag));
        out.dedup_by(|a, b| a.tag == b.tag);
        out
    }

    /// Every tag that would be an arch tag of `target`, sorted by tag name:
    /// the patterns rendered with each alias, kept where they match back to
    /// `target` (`x86_64_v1` is arch `x86_64` of `v1`, never `x86` of
    /// `64_v1`). What a listing would show of `target`'s arch tags is
    /// exactly those of these that exist, whatever the repository's size.
    pub fn candidates(&self, target: &str) -> Vec<ArchTag> {
        let mut out: Vec<ArchTag> = self
            .aliases
            .iter()
            .flat_map(|(alias, _)| {
                self.patterns
                    .iter()
                    .filter_map(move |p| p.render(alias, target))
            })
            .filter_map(|tag| self.match_tag(&tag))
            .filter(|m| m.target == target)
            .collect();
        out.sort_by(|a, b| a.tag.cmp(&b.tag));
        out.dedup_by(|a, b| a.tag == b.tag);
        out
    }

    /// The structural match, before the "target must not be an arch tag" rule.
    ///
    /// The (pattern, alias) combination that fits the tag's literal structure with the
    /// longest alias (then the earliest pattern) is chosen first, and only then is its `{tag}`
    /// part checked: if that is empty or not a valid tag, there is no match, rather than a
    /// fallback to a shorter alias. So `x86_64_` is not arch `x86` with target `64_`.
    fn candidate(&self, tag: &str) -> Option<ArchTag> {
        if !is_valid_tag(tag) || is_referrers_tag(tag) {
            return None;
        }
        // Preference: longest alias, then earliest pattern, then alias name (only to make
        // the choice total). A full scan: a few dozen prefix/suffix tests per tag.
        let mut best: Option<(Preference, &str, &Platform, &str)> = None;
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
                if better {
                    best = Some((order, alias, platform, target));
                }
            }
        }
        let (_, alias, platform, target) = best.filter(|(.., target)| is_valid_tag(target))?;
        Some(ArchTag {
            tag: tag.to_owned(),
            alias: alias.to_owned(),
            platform: platform.clone(),
            target: target.to_owned(),
        })
    }
}

// === helpers ===

/// How good a (pattern, alias) fit is: smaller is better (longest alias, then earliest pattern).
type Preference = (std::cmp::Reverse<usize>, usize);

fn is_tag_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

/// An alias is at most a whole tag of tag characters.
fn is_alias_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(is_tag_byte)
}

/// The prefix of archmerge's keep tags.
pub const KEEP_PREFIX: &str = "archmerge.keep.";

/// The tag that keeps manifest `digest` reachable in a repository where
/// archmerge put it there (a child copied under a repository pattern) or
/// took its tag away (what a target held before archmerge amended it):
/// distribution's `garbage-collect --delete-untagged` deletes every
/// untagged manifest, even one a tagged index lists. `archmerge.keep.`
/// and the digest's hex: never an arch tag, never a target.
pub fn keep_tag(digest: &str) -> String {
    let hex = digest.split_once(':').map_or(digest, |(_, h)| h);
    format!(
        "{KEEP_PREFIX}{}",
        &hex[..hex.len().min(128 - KEEP_PREFIX.len())]
    )
}

/// Whether `tag` is one of archmerge's keep tags.
pub fn is_keep_tag(tag: &str) -> bool {
    tag.starts_with(KEEP_PREFIX)
}

/// A referrers fallback tag (`<alg>-<ref>`, OCI distribution 1.1, the digest's encoded part
/// truncated to 64 characters): `[a-z0-9]+-[0-9a-f]{64}`.
pub fn is_referrers_tag(s: &str) -> bool {
    let Some((alg, hex)) = s.split_once('-') else {
        return false;
    };
    !alg.is_empty()
        && alg
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && hex.len() == 64
        && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests;
