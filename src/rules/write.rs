//! What a write means (SPEC §3, §4): for a manifest stored or deleted at a
//! repository, which targets it touches and how.
//!
//! The one answer the PUT and DELETE handlers, the webhook and reconcile all
//! use ([`Rule::touches`]). Pure: whether a tag really is a target (has arch
//! tags, or holds an index of archmerge's) is the registry's to say, so a
//! write at any other tag is reported as a possible target and the merge
//! finds out.

use super::repository::Rule;
use super::tags::{is_keep_tag, is_referrers_tag, ArchTag};

/// What a tag of a repository is to the merge.
// Not boxed: made once per tag looked at and consumed at once.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// An arch tag: its target lives in `repo` (the tag's own repository, or
    /// the target repository under a repository pattern).
    Arch {
        /// The repository the target lives in.
        repo: String,
        /// The arch tag, with its platform and target.
        arch: ArchTag,
    },
    /// Any other tag: perhaps a target.
    Target,
    /// A referrers fallback tag (`sha256-<hex>`) or one of archmerge's keep
    /// tags (`archmerge.keep.<hex>`): never merged, never a target.
    Untouched,
}

/// What the registry did at a repository.
#[derive(Clone, Copy, Debug)]
pub enum Write<'a> {
    /// A manifest was stored at this tag.
    Put(&'a str),
    /// The manifest at these tags was deleted: a delete by tag names one; a
    /// delete by digest names every arch tag that pointed at it, found
    /// before the delete.
    Deleted(&'a [String]),
    /// A manifest was deleted by digest, and which tags pointed at it is not
    /// known (a webhook event, or a lookup before the delete that failed).
    DeletedUnknown,
}

/// How a write touches a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum How {
    /// An arch tag of the target was stored or deleted: rebuild the target.
    ArchChanged,
    /// Something was stored at the target tag itself: rebuild the target on
    /// it as the new base (a no-op when the target has no arch tags).
    NewBase,
    /// The target's own index was deleted: honoured. Nothing is rebuilt
    /// until the next arch push of the target or a reconcile.
    Deleted,
}

/// A target a write touches.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Touch {
    /// One target, `repo:target`.
    Target {
        /// The repository the target lives in.
        repo: String,
        /// The target tag.
        target: String,
        /// How it is touched.
        how: How,
    },
    /// Some targets of `repo`, unknown which: every target that exists now
    /// is rebuilt (one whose index was deleted stays deleted).
    ExistingTargets {
        /// The repository.
        repo: String,
    },
}

impl Touch {
    /// `repo:target`, touched `how` (for tests that spell touches out).
    #[cfg(test)]
    pub fn target(repo: &str, target: &str, how: How) -> Touch {
        Touch::Target {
            repo: repo.into(),
            target: target.into(),
            how,
        }
    }
}

impl Rule {
    /// What `tag` of `repo` is to the merge: an arch tag of this rule's tag
    /// patterns, or of a repository pattern (then of the target
    /// repository's tag), a referrers fallback tag, or a possible target.
    pub fn role(&self, repo: &str, tag: &str) -> Role {
        if let Some(arch) = self.match_tag(tag) {
            return Role::Arch {
                repo: repo.to_owned(),
                arch,
            };
        }
        if let Some((target_repo, arch)) = self.match_repository(repo, tag) {
            return Role::Arch {
                repo: target_repo,
                arch,
            };
        }
        if is_referrers_tag(tag) || is_keep_tag(tag) {
            return Role::Untouched;
        }
        Role::Target
    }

    /// The targets a write at `repo` touches, and how; sorted, without
    /// duplicates.
    pub fn touches(&self, repo: &str, write: Write<'_>) -> Vec<Touch> {
        let mut out = Vec::new();
        let mut one = |tag: &str, at_target: How| match self.role(repo, tag) {
            Role::Arch { repo, arch } => out.push(Touch::Target {
                repo,
                target: arch.target,
                how: How::ArchChanged,
            }),
            Role::Target => out.push(Touch::Target {
                repo: repo.to_owned(),
                target: tag.to_owned(),
                how: at_target,
            }),
            Role::Untouched => {}
        };
        match write {
            Write::Put(tag) => one(tag, How::NewBase),
            Write::Deleted(tags) => tags.iter().for_each(|t| one(t, How::Deleted)),
            Write::DeletedUnknown => {
                out.push(Touch::ExistingTargets {
                    repo: repo.to_owned(),
                });
                if let Some(target_repo) = self.target_repository(repo) {
                    out.push(Touch::ExistingTargets { repo: target_repo });
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::repository::RepoPattern;
    use crate::rules::tags::{keep_tag, TagRules};

    fn default_rule() -> Rule {
        Rule::from_tags(TagRules::default())
    }

    fn patterned() -> Rule {
        let mut r = default_rule();
        r.repository_patterns = vec![RepoPattern::parse("{repo}-{arch}").unwrap()];
        r
    }

    fn target(repo: &str, target: &str, how: How) -> Touch {
        Touch::target(repo, target, how)
    }

    #[test]
    fn an_arch_push_touches_its_target() {
        let r = default_rule();
        assert_eq!(
            r.touches("app", Write::Put("aarch64_v1.2")),
            [target("app", "v1.2", How::ArchChanged)]
        );
        assert_eq!(
            r.touches("app", Write::Put("x86_64")),
            [target("app", "latest", How::ArchChanged)]
        );
    }

    #[test]
    fn a_push_at_any_other_tag_may_be_a_new_base() {
        let r = default_rule();
        assert_eq!(
            r.touches("app", Write::Put("v3")),
            [target("app", "v3", How::NewBase)]
        );
        // An arch-tag-shaped tag whose target would be an arch tag is a plain tag.
        assert_eq!(
            r.touches("app", Write::Put("aarch64_x86_64")),
            [target("app", "aarch64_x86_64", How::NewBase)]
        );
    }

    #[test]
    fn referrers_and_keep_tags_touch_nothing() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let r = default_rule();
        for tag in [format!("sha256-{}", "a".repeat(64)), keep_tag(&digest)] {
            assert!(crate::oci::is_valid_tag(&tag), "{tag}");
            assert_eq!(r.touches("app", Write::Put(&tag)), []);
            assert_eq!(r.touches("app", Write::Deleted(&[tag])), []);
        }
    }

    #[test]
    fn deletes_rebuild_arch_targets_and_honour_target_deletes() {
        let r = default_rule();
        let tags = ["x86_64_v1".to_owned(), "aarch64_v2".into(), "v1".into()];
        assert_eq!(
            r.touches("app", Write::Deleted(&tags)),
            [
                target("app", "v1", How::ArchChanged),
                target("app", "v1", How::Deleted),
                target("app", "v2", How::ArchChanged),
            ]
        );
    }

    #[test]
    fn repository_patterns_touch_the_target_repository_both_ways() {
        let r = patterned();
        assert_eq!(
            r.touches("wg/tool-s390x", Write::Put("v2")),
            [target("wg/tool", "v2", How::ArchChanged)]
        );
        assert_eq!(
            r.touches("wg/tool-s390x", Write::Deleted(&["v2".to_owned()])),
            [target("wg/tool", "v2", How::ArchChanged)]
        );
        // Pushed at the target repository itself: a new base there.
        assert_eq!(
            r.touches("wg/tool", Write::Put("v2")),
            [target("wg/tool", "v2", How::NewBase)]
        );
    }

    #[test]
    fn an_unknown_delete_repairs_the_existing_targets_of_both_repositories() {
        let r = patterned();
        assert_eq!(
            r.touches("wg/tool-s390x", Write::DeletedUnknown),
            [
                Touch::ExistingTargets {
                    repo: "wg/tool".into()
                },
                Touch::ExistingTargets {
                    repo: "wg/tool-s390x".into()
                },
            ]
        );
        assert_eq!(
            default_rule().touches("app", Write::DeletedUnknown),
            [Touch::ExistingTargets { repo: "app".into() }]
        );
    }
}
