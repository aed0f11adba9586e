//! `[aliases]`, `[merge]` and `[[rules]]` → a validated [`RuleSet`], every
//! problem reported with its key and position.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use toml::Spanned;

use super::{Check, Mode, RawMerge, S};
use crate::index::{IndexFormat, PlatformSource};
use crate::platform::PlatformKey;
use crate::rules::tags::DEFAULT_PATTERNS;
use crate::rules::{arch_key, Glob, RepoPattern, Rule, RuleSet, WriteWith};
use crate::rules::{AliasTable, Pattern, TagRules};

/// One `[[rules]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    repositories: Spanned<Vec<S>>,
    tag_patterns: Option<Vec<S>>,
    repository_patterns: Option<Vec<S>>,
    arches: Option<Vec<S>>,
    required: Option<Vec<S>>,
    extra_targets: Option<Vec<S>>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    platform_source: Option<PlatformSource>,
    index_media_type: Option<IndexFormat>,
    write_with: Option<Spanned<WriteWith>>,
}

impl Check<'_> {
    pub(super) fn rules(
        &mut self,
        raw_aliases: BTreeMap<String, S>,
        merge: RawMerge,
        raw_rules: Vec<RawRule>,
        mode: Mode,
        has_own_credentials: bool,
    ) -> RuleSet {
        let mut aliases = AliasTable::default_table();
        for (alias, platform) in &raw_aliases {
            if let Err(e) = aliases.insert(alias, platform.get_ref()) {
                self.error(&format!("aliases.{alias}"), Some(platform.span().start), e);
            }
        }
        let default_patterns = match merge.patterns {
            None => DEFAULT_PATTERNS
                .iter()
                .map(|p| Pattern::parse(p).expect("default patterns parse"))
                .collect(),
            Some(given) => {
                if given.is_empty() {
                    self.errors
                        .push("merge.patterns: at least one pattern is needed".into());
                }
                self.tag_patterns("merge.patterns", given)
            }
        };
        let platform_source = merge.platform_source.unwrap_or_default();
        let index_format = merge.index_media_type.unwrap_or_default();
        let mut default = Rule::from_tags(TagRules::new(aliases.clone(), default_patterns.clone()));
        default.platform_source = platform_source;
        default.index_format = index_format;

        let mut rules = Vec::new();
        let mut seen_globs: BTreeSet<Vec<String>> = BTreeSet::new();
        for (i, raw) in raw_rules.into_iter().enumerate() {
            let key = format!("rules[{i}]");
            let at = Some(raw.repositories.span().start);
            let globs: Vec<String> = raw
                .repositories
                .into_inner()
                .into_iter()
                .map(Spanned::into_inner)
                .collect();
            if globs.is_empty() {
                self.error(
                    &format!("{key}.repositories"),
                    at,
                    "at least one glob is needed",
                );
            }
            if !seen_globs.insert(globs.clone()) {
                self.error(
                    &format!("{key}.repositories"),
                    at,
                    "the same globs as an earlier rule, which always wins: this rule could never apply",
                );
            }
            let repository_patterns: Vec<RepoPattern> = raw
                .repository_patterns
                .unwrap_or_default()
                .into_iter()
                .filter_map(|p| {
                    RepoPattern::parse(p.get_ref())
                        .map_err(|e| {
                            let k = format!("{key}.repository_patterns");
                            self.error(&k, Some(p.span().start), format!("{:?}: {e}", p.get_ref()))
                        })
                        .ok()
                })
                .collect();
            let tag_patterns = match raw.tag_patterns {
                Some(given) => self.tag_patterns(&format!("{key}.tag_patterns"), given),
                // A rule of repository patterns only has no arch tags.
                None if !repository_patterns.is_empty() => Vec::new(),
                None => default_patterns.clone(),
            };
            let arches = raw
                .arches
                .map(|list| self.arch_keys(&aliases, &format!("{key}.arches"), list));
            let required = raw
                .required
                .map(|list| self.arch_keys(&aliases, &format!("{key}.required"), list))
                .unwrap_or_default();
            if let Some(allowed) = &arches {
                for k in required.difference(allowed) {
                    self.error(
                        &format!("{key}.required"),
                        at,
                        format!(
                            "{k} is required but not in `arches`, so it could never be present"
                        ),
                    );
                }
            }
            let mut rule = Rule::from_tags(TagRules::new(aliases.clone(), tag_patterns));
            rule.repositories = globs.iter().map(|g| Glob::new(g)).collect();
            rule.repository_patterns = repository_patterns;
            rule.arches = arches;
            rule.required = required;
            rule.annotations = raw.annotations;
            rule.platform_source = raw.platform_source.unwrap_or(platform_source);
            rule.index_format = raw.index_media_type.unwrap_or(index_format);
            if let Some(w) = raw.write_with {
                let at = Some(w.span().start);
                rule.write_with = w.into_inner();
                if rule.write_with == WriteWith::Archmerge && !has_own_credentials {
                    self.error(
                        &format!("{key}.write_with"),
                        at,
                        "\"archmerge\" needs archmerge's own credentials: set [upstream_auth]",
                    );
                }
            }
            for t in raw.extra_targets.unwrap_or_default() {
                let k = format!("{key}.extra_targets");
                if !crate::oci::is_valid_tag(t.get_ref()) {
                    self.error(
                        &k,
                        Some(t.span().start),
                        format!("{:?} is not a valid tag", t.get_ref()),
                    );
                } else if rule.is_arch_tag(t.get_ref()) {
                    self.error(
                        &k,
                        Some(t.span().start),
                        format!("{:?} is itself an arch tag", t.get_ref()),
                    );
                } else {
                    rule.extra_targets.push(t.into_inner());
                }
            }
            if mode == Mode::Serve
                && (!rule.extra_targets.is_empty() || !rule.repository_patterns.is_empty())
            {
                self.error(
                    &key,
                    at,
                    "extra_targets and repository_patterns need mode = \"write\" (they write to the registry)",
                );
            }
            rules.push(rule);
        }
        RuleSet { rules, default }
    }

    fn tag_patterns(&mut self, key: &str, given: Vec<S>) -> Vec<Pattern> {
        let mut out: Vec<Pattern> = Vec::new();
        for p in given {
            match Pattern::parse(p.get_ref()) {
                Ok(pattern) if out.iter().any(|o| o.as_str() == pattern.as_str()) => self.error(
                    key,
                    Some(p.span().start),
                    format!("{:?} is listed twice", p.get_ref()),
                ),
                Ok(pattern) => out.push(pattern),
                Err(e) => self.error(key, Some(p.span().start), format!("{:?}: {e}", p.get_ref())),
            }
        }
        out
    }

    fn arch_keys(
        &mut self,
        aliases: &AliasTable,
        key: &str,
        list: Vec<S>,
    ) -> BTreeSet<PlatformKey> {
        let mut out = BTreeSet::new();
        for name in list {
            match arch_key(aliases, name.get_ref()) {
                Some(k) => {
                    out.insert(k);
                }
                None => self.error(
                    key,
                    Some(name.span().start),
                    format!(
                        "unknown arch {:?}: not an alias nor an os/arch platform",
                        name.get_ref()
                    ),
                ),
            }
        }
        out
    }
}
