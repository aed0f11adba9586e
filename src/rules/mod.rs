//! Which writes merge, and into what (SPEC §1): pure, no I/O.
//!
//! - [`tags`] — the arch alias table and tag patterns: is `aarch64_v1.2` an
//!   arch tag, and of which target?
//! - [`repository`] — per-repository rules: globs, repository patterns,
//!   allow-lists, required sets, extra targets, index format.
//! - [`mod@write`] — what a write means: which targets a manifest stored or
//!   deleted at a tag touches, and how. The one answer every caller uses.
//!
//! `config` builds a [`RuleSet`] from the TOML (`config/rules.rs` holds that
//! mapping, since it reports errors with config's positions); everything
//! else asks the rule set which [`Rule`] applies to a repository.

pub mod repository;
pub mod tags;
pub mod write;

pub use repository::{arch_key, Glob, RepoPattern, Rule, RuleSet, WriteWith};
pub use tags::{AliasTable, ArchTag, Pattern, TagRules};
pub use write::{How, Role, Touch, Write};
