//! Tag rules on any text: `Pattern::parse` on the first line, then
//! `match_tag` of the rest with the default rules and with that pattern.
//! Never panics; a match keeps the tag, names a known alias, and targets a
//! valid tag that is itself no arch tag.

#![no_main]

use archmerge::oci::is_valid_tag;
use archmerge::rules::{AliasTable, Pattern, TagRules};
use libfuzzer_sys::fuzz_target;

fn check(rules: &TagRules, tag: &str) {
    let Some(m) = rules.match_tag(tag) else {
        return;
    };
    assert_eq!(m.tag, tag);
    assert!(is_valid_tag(tag), "{tag:?} matched but is no valid tag");
    assert!(is_valid_tag(&m.target), "{tag:?} → target {:?}", m.target);
    assert!(
        !rules.is_arch_tag(&m.target),
        "{tag:?} → target {:?} is itself an arch tag",
        m.target
    );
    assert!(tag.contains(m.alias.as_str()), "{tag:?} → alias {:?}", m.alias);
    assert_eq!(rules.aliases.lookup(&m.alias), Some(&m.platform));
    assert_eq!(rules.arch_tags_for_target([tag], &m.target).len(), 1);
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (pattern, tag) = text.split_once('\n').unwrap_or(("", text));
    check(&TagRules::default(), tag);
    if let Ok(p) = Pattern::parse(pattern) {
        assert_eq!(p.as_str(), pattern);
        assert!(pattern.contains("{arch}"), "{pattern:?} parsed without {{arch}}");
        let rules = TagRules::new(AliasTable::default_table(), vec![p]);
        check(&rules, tag);
    }
});
