//! Tests of `rules`: every SPEC §1 example and the edge cases, as rstest tables, and the
//! properties that matching never panics and never targets an arch tag.

use super::*;
use proptest::prelude::*;
use rstest::rstest;

const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn rules(patterns: &[&str]) -> TagRules {
    let patterns = patterns
        .iter()
        .map(|p| Pattern::parse(p).unwrap())
        .collect();
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
#[case("x86_64_", None)] // empty {tag}; no fallback to `x86` + `64_`
#[case("x86_64_.v1", None)] // invalid {tag}; ditto
#[case("x86_64.v1", Some(("x86", "64.v1", "linux/386")))] // `x86_64_` does not fit, `x86_` does
#[case("aarch64_.hidden", None)] // {tag} must start with [A-Za-z0-9_]
#[case("aarch64__x", Some(("aarch64", "_x", "linux/arm64/v8")))]
#[case("AARCH64_v1", None)] // aliases are case-sensitive
#[case("aarch64-v1", None)] // not a default pattern
#[case("aarch64_x86_64", None)] // target would be an arch tag
#[case("aarch64_aarch64_v1", None)] // ditto
#[case("aarch64_aarch64_aarch64", None)] // structural test: no alternation
#[case("x86_64_x86", None)] // longest alias decides, its target is an arch tag
#[case(
    "aarch64_sha256-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    None
)]
#[case(
    "sha256-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    None
)]
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
    assert_eq!(
        windows_rules().match_tag("v1.0-amd64").unwrap().alias,
        "amd64"
    );
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
    let got =
        AliasTable::with_overrides(&map).map(|t| t.lookup(alias).map(ToString::to_string).unwrap());
    assert_eq!(got, want.map(str::to_owned));
}

#[test]
fn table_iterates_longest_first() {
    let table = AliasTable::default_table();
    let lens: Vec<usize> = table.iter().map(|(a, _)| a.len()).collect();
    assert!(lens.windows(2).all(|w| w[0] >= w[1]), "{lens:?}");
    assert_eq!(table.iter().count(), 25);
    assert_eq!(
        table.lookup("arm64v8").unwrap().to_string(),
        "linux/arm64/v8"
    );
    assert!(table.lookup("ARM64").is_none());
}

#[test]
fn arch_tags_for_target_sorted_and_filtered() {
    let tags = [
        "x86_64_v1",
        "v1",
        "aarch64_v1",
        "aarch64_v2",
        "armhf_v1",
        "aarch64",
        "x86_64_v1",
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

    #[test]
    fn the_candidates_of_a_target_are_exactly_what_a_listing_would_show(
        target in prop::sample::select(vec!["v1", "latest", "64_v1", "1.0", "v1_2", "x86"]),
        picked in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        noise in prop::collection::vec("[A-Za-z0-9_.-]{1,16}", 0..12),
        patterns in prop::sample::select(vec![
            vec!["{arch}_{tag}", "{arch}"],
            vec!["{tag}-{arch}"],
            vec!["{arch}-{tag}", "{arch}"],
        ]),
    ) {
        let r = rules(&patterns);
        let candidates = r.candidates(target);
        // A repository holding some of the candidates, and other tags
        // (some of them arch tags of other targets).
        let mut tags: Vec<String> = picked
            .iter()
            .filter(|_| !candidates.is_empty())
            .map(|i| i.get(&candidates).tag.clone())
            .collect();
        tags.extend(noise);
        tags.push(format!("x86_64_{target}x"));
        let listed: Vec<String> = r
            .arch_tags_for_target(tags.iter().map(String::as_str), target)
            .into_iter()
            .map(|m| m.tag)
            .collect();
        let present: Vec<String> = candidates
            .iter()
            .filter(|c| tags.contains(&c.tag))
            .map(|c| c.tag.clone())
            .collect();
        prop_assert_eq!(listed, present);
    }
}
