//! Per-repository merge rules: which repositories a rule covers (globs),
//! its tag patterns or repository patterns, allow-list, required set, extra
//! targets, index annotations, platform source and index media type.
//!
//! Pure: `config` builds a [`RuleSet`] from `[[rules]]`; `intercept`,
//! `merge`, `serve`, `events` and `reconcile` ask it which [`Rule`] applies
//! to a repository. The first rule whose `repositories` glob matches wins;
//! otherwise the built-in default rule (SPEC §1 defaults) applies.

use std::collections::{BTreeMap, BTreeSet};

use super::tags::{AliasTable, ArchTag, TagRules};
use crate::index::{IndexFormat, PlatformSource};
use crate::oci::{is_valid_name, is_valid_tag};
use crate::platform::{Platform, PlatformKey};

/// A repository glob: `*` matches within one path component, `**` across
/// components; everything else literally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    /// A glob from its text.
    pub fn new(pattern: &str) -> Glob {
        Glob(pattern.to_owned())
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        glob_match(self.0.as_bytes(), name.as_bytes())
    }
}

fn glob_match(p: &[u8], s: &[u8]) -> bool {
    match p {
        [] => s.is_empty(),
        [b'*', b'*', rest @ ..] => (0..=s.len()).any(|i| glob_match(rest, &s[i..])),
        [b'*', rest @ ..] => (0..=s.len())
            .take_while(|&i| i == 0 || s[i - 1] != b'/')
            .any(|i| glob_match(rest, &s[i..])),
        [c, rest @ ..] => s.first() == Some(c) && glob_match(rest, &s[1..]),
    }
}

/// A repository pattern over `{repo}` and `{arch}`, e.g. `{repo}-{arch}`:
/// `wg/go-ui-amd64` is arch `amd64` of the target repository `wg/go-ui`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoPattern {
    source: String,
}

/// Why a repository pattern is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RepoPatternError {
    /// `{repo}` and `{arch}` must each appear exactly once.
    #[error("needs {{repo}} and {{arch}} exactly once each")]
    Placeholders,
    /// Only `{repo}` and `{arch}` are placeholders here.
    #[error("unknown placeholder in {0:?}: only {{repo}} and {{arch}} are allowed")]
    Unknown(String),
    /// The two placeholders need a literal between them.
    #[error("{{repo}} and {{arch}} need a literal between them")]
    Adjacent,
}

impl RepoPattern {
    /// Parses and checks a pattern.
    pub fn parse(s: &str) -> Result<RepoPattern, RepoPatternError> {
        if s.matches("{repo}").count() != 1 || s.matches("{arch}").count() != 1 {
            return Err(RepoPatternError::Placeholders);
        }
        let rest = s.replace("{repo}", "").replace("{arch}", "");
        if rest.contains('{') || rest.contains('}') {
            return Err(RepoPatternError::Unknown(s.to_owned()));
        }
        if s.contains("{repo}{arch}") || s.contains("{arch}{repo}") {
            return Err(RepoPatternError::Adjacent);
        }
        Ok(RepoPattern {
            source: s.to_owned(),
        })
    }

    /// The source repository of arch `alias` of `repo`.
    pub fn render(&self, repo: &str, alias: &str) -> String {
        self.source.replace("{repo}", repo).replace("{arch}", alias)
    }

    /// `(target repo, alias)` if `name` fits with `alias` in `{arch}`.
    fn match_alias(&self, name: &str, alias: &str) -> Option<String> {
        let with_arch = self.source.replace("{arch}", alias);
        let (prefix, suffix) = with_arch.split_once("{repo}")?;
        let repo = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
        is_valid_name(repo).then(|| repo.to_owned())
    }
}

/// Whose credentials the copies into a target repository and the index
/// writes of a rule's targets carry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteWith {
    /// The pushing client's own (the default): archmerge never writes what
    /// that client could not.
    #[default]
    Client,
    /// archmerge's own (`upstream_auth`): for token registries whose push
    /// tokens cover only the pushed repository, so a client allowed to push
    /// a per-arch repository gets its target written for it.
    Archmerge,
}

/// One `[[rules]]` entry, validated.
#[derive(Clone, Debug)]
pub struct Rule {
    /// Repositories (pushed and target) the rule covers.
    pub repositories: Vec<Glob>,
    /// Tag patterns and the alias table.
    pub tags: TagRules,
    /// Repository patterns (one repository per arch).
    pub repository_patterns: Vec<RepoPattern>,
    /// Only these platforms merge; other arch names are plain tags.
    pub arches: Option<BTreeSet<PlatformKey>>,
    /// No index is published until every one of these is present.
    pub required: BTreeSet<PlatformKey>,
    /// The same index is also written at these tags (write mode).
    pub extra_targets: Vec<String>,
    /// Index-level annotations (OCI indexes only).
    pub annotations: BTreeMap<String, String>,
    /// Whether the alias or the image config decides the platform.
    pub platform_source: PlatformSource,
    /// Docker list, OCI index, or chosen by the children.
    pub index_format: IndexFormat,
    /// Whose credentials write the rule's targets.
    pub write_with: WriteWith,
}

impl Rule {
    /// The default rule over the given tag rules.
    pub fn from_tags(tags: TagRules) -> Rule {
        Rule {
            repositories: Vec::new(),
            tags,
            repository_patterns: Vec::new(),
            arches: None,
            required: BTreeSet::new(),
            extra_targets: Vec::new(),
            annotations: BTreeMap::new(),
            platform_source: PlatformSource::Alias,
            index_format: IndexFormat::Auto,
            write_with: WriteWith::Client,
        }
    }

    /// Whether a platform may merge under this rule.
    pub fn allows(&self, platform: &Platform) -> bool {
        self.arches
            .as_ref()
            .is_none_or(|a| a.contains(&platform.key()))
    }

    /// Whether `tag` is an arch tag here (tag patterns and allow-list).
    pub fn match_tag(&self, tag: &str) -> Option<ArchTag> {
        self.tags
            .match_tag(tag)
            .filter(|a| self.allows(&a.platform))
    }

    /// Whether `tag` is an arch tag here.
    pub fn is_arch_tag(&self, tag: &str) -> bool {
        self.match_tag(tag).is_some()
    }

    /// The arch tags among `tags` that feed `target`, sorted by name.
    pub fn arch_tags_for_target<'a>(
        &self,
        tags: impl IntoIterator<Item = &'a str>,
        target: &str,
    ) -> Vec<ArchTag> {
        let mut v = self.tags.arch_tags_for_target(tags, target);
        v.retain(|a| self.allows(&a.platform));
        v
    }

    /// Every tag that would be an arch tag of `target` here (tag patterns
    /// and allow-list), sorted by name.
    pub fn candidates(&self, target: &str) -> Vec<ArchTag> {
        let mut v = self.tags.candidates(target);
        v.retain(|a| self.allows(&a.platform));
        v
    }

    /// For a pushed repository that a repository pattern matches: the
    /// target repository, and the arch of the push (as an [`ArchTag`] whose
    /// `tag` is `"<pushed repo>:<tag>"` and whose `target` is `tag`).
    pub fn match_repository(&self, repo: &str, tag: &str) -> Option<(String, ArchTag)> {
        if !is_valid_tag(tag) || self.tags.is_arch_tag(tag) {
            return None;
        }
        let (target_repo, alias, platform) = self.source_of(repo)?;
        Some((
            target_repo,
            ArchTag {
                tag: format!("{repo}:{tag}"),
                alias: alias.to_owned(),
                platform: platform.clone(),
                target: tag.to_owned(),
            },
        ))
    }

    /// The target repository of a per-arch repository (one a repository
    /// pattern matches).
    pub fn target_repository(&self, repo: &str) -> Option<String> {
        self.source_of(repo).map(|(target_repo, ..)| target_repo)
    }

    /// (target repository, alias, platform) of a per-arch repository: the
    /// longest alias that fits any repository pattern wins.
    fn source_of(&self, repo: &str) -> Option<(String, &str, &Platform)> {
        let mut best: Option<(String, &str, &Platform)> = None;
        for pattern in &self.repository_patterns {
            for (alias, platform) in self.tags.aliases.iter() {
                if !self.allows(platform) {
                    continue;
                }
                if let Some(target) = pattern.match_alias(repo, alias) {
                    if best.as_ref().is_none_or(|b| alias.len() > b.1.len()) {
                        best = Some((target, alias, platform));
                    }
                }
            }
        }
        best
    }

    /// Every source repository a target repository may draw arches from,
    /// with the arch each stands for.
    pub fn source_repositories(&self, target_repo: &str) -> Vec<(String, String, Platform)> {
        let mut out = Vec::new();
        for pattern in &self.repository_patterns {
            for (alias, platform) in self.tags.aliases.iter() {
                if self.allows(platform) {
                    out.push((
                        pattern.render(target_repo, alias),
                        alias.to_owned(),
                        platform.clone(),
                    ));
                }
            }
        }
        out
    }

    /// The required platforms missing from `present`.
    pub fn missing<'a>(
        &'a self,
        present: &BTreeSet<PlatformKey>,
    ) -> impl Iterator<Item = &'a PlatformKey> + 'a {
        let present = present.clone();
        self.required.iter().filter(move |k| !present.contains(*k))
    }
}

/// The rules in order, and the default.
#[derive(Clone, Debug)]
pub struct RuleSet {
    /// `[[rules]]` in file order.
    pub rules: Vec<Rule>,
    /// What applies when no rule's glob matches.
    pub default: Rule,
}

impl RuleSet {
    /// Only the default rule.
    pub fn single(default: Rule) -> RuleSet {
        RuleSet {
            rules: Vec::new(),
            default,
        }
    }

    /// The rule for a repository: the first whose glob matches, else the
    /// default.
    pub fn for_repo(&self, repo: &str) -> &Rule {
        self.rules
            .iter()
            .find(|r| r.repositories.iter().any(|g| g.matches(repo)))
            .unwrap_or(&self.default)
    }
}

/// An arch name of an allow-list or required set: an alias, or a platform
/// like `linux/arm64`.
pub fn arch_key(aliases: &AliasTable, name: &str) -> Option<PlatformKey> {
    aliases
        .lookup(name)
        .map(Platform::key)
        .or_else(|| Platform::parse(name).ok().map(|p| p.key()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::tags::Pattern;
    use rstest::rstest;

    #[rstest]
    #[case("ls/*", "ls/app", true)]
    #[case("ls/*", "ls/a/b", false)]
    #[case("ls/**", "ls/a/b", true)]
    #[case("*", "app", true)]
    #[case("*", "a/b", false)]
    #[case("wg/*-ui*", "wg/go-ui-amd64", true)]
    #[case("req/app", "req/app", true)]
    #[case("req/app", "req/apps", false)]
    fn globs(#[case] glob: &str, #[case] name: &str, #[case] ok: bool) {
        assert_eq!(Glob::new(glob).matches(name), ok, "{glob} vs {name}");
    }

    fn rule(patterns: &[&str]) -> Rule {
        let tags = TagRules::new(
            AliasTable::default_table(),
            patterns
                .iter()
                .map(|p| Pattern::parse(p).unwrap())
                .collect(),
        );
        Rule::from_tags(tags)
    }

    #[test]
    fn repository_patterns_find_the_target_repository() {
        let mut r = rule(&["{arch}_{tag}"]);
        r.repository_patterns = vec![RepoPattern::parse("{repo}-{arch}").unwrap()];
        let (target, arch) = r.match_repository("wg/go-ui-amd64", "v1.0.2").unwrap();
        assert_eq!(target, "wg/go-ui");
        assert_eq!(arch.platform.key().to_string(), "linux/amd64");
        assert_eq!(arch.tag, "wg/go-ui-amd64:v1.0.2");
        assert_eq!(arch.target, "v1.0.2");
        // `x86_64` beats `x86`: the longest alias wins.
        let (target, arch) = r.match_repository("wg/app-x86_64", "v1").unwrap();
        assert_eq!((target.as_str(), arch.alias.as_str()), ("wg/app", "x86_64"));
        assert!(r.match_repository("wg/go-ui", "v1").is_none());
        assert!(r
            .source_repositories("wg/go-ui")
            .iter()
            .any(|(repo, alias, _)| repo == "wg/go-ui-arm64" && alias == "arm64"));
    }

    #[test]
    fn repository_patterns_are_checked() {
        assert_eq!(
            RepoPattern::parse("{repo}"),
            Err(RepoPatternError::Placeholders)
        );
        assert_eq!(
            RepoPattern::parse("{repo}{arch}"),
            Err(RepoPatternError::Adjacent)
        );
        assert!(matches!(
            RepoPattern::parse("{repo}-{arch}-{tag}"),
            Err(RepoPatternError::Unknown(_))
        ));
        assert!(RepoPattern::parse("{arch}/{repo}").is_ok());
    }

    #[test]
    fn an_allow_list_makes_other_arches_plain_tags() {
        let mut r = rule(&["{arch}_{tag}"]);
        let aliases = AliasTable::default_table();
        r.arches = Some(
            ["amd64", "linux/arm64"]
                .iter()
                .map(|a| arch_key(&aliases, a).unwrap())
                .collect(),
        );
        assert!(r.is_arch_tag("x86_64_v1"));
        assert!(r.is_arch_tag("aarch64_v1"));
        assert!(!r.is_arch_tag("s390x_v1"));
        assert!(!r.is_arch_tag("armv7l_v1"));
    }

    #[test]
    fn the_first_matching_rule_wins() {
        let mut ls = rule(&["{arch}-{tag}"]);
        ls.repositories = vec![Glob::new("ls/*")];
        let set = RuleSet {
            rules: vec![ls],
            default: rule(&["{arch}_{tag}", "{arch}"]),
        };
        assert_eq!(
            set.for_repo("ls/app")
                .match_tag("arm64v8-latest")
                .unwrap()
                .target,
            "latest"
        );
        assert!(set.for_repo("ls/app").match_tag("arm64v8_1.0").is_none());
        assert_eq!(
            set.for_repo("other")
                .match_tag("aarch64_1.0")
                .unwrap()
                .target,
            "1.0"
        );
    }

    #[test]
    fn missing_required_platforms() {
        let mut r = rule(&["{arch}_{tag}"]);
        let aliases = AliasTable::default_table();
        r.required = ["amd64", "arm64"]
            .iter()
            .map(|a| arch_key(&aliases, a).unwrap())
            .collect();
        let present: BTreeSet<_> = [arch_key(&aliases, "x86_64").unwrap()].into();
        let missing: Vec<String> = r.missing(&present).map(|k| k.to_string()).collect();
        assert_eq!(missing, vec!["linux/arm64/v8"]);
    }
}
