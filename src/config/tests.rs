//! Unit tests of settings parsing, on inline TOML.
use super::*;

fn settings() -> Settings {
    Settings::default()
}

#[test]
fn flags_alone_are_enough() {
    let s = Settings {
        listen: Some("127.0.0.1:6000".into()),
        upstream: Some("http://127.0.0.1:5000".into()),
        ..settings()
    };
    let c = Config::from_toml(&s, "").unwrap();
    assert_eq!(c.listen.port(), 6000);
    assert_eq!(c.upstream.origin, "http://127.0.0.1:5000");
    assert_eq!(c.mode, Mode::Write);
    assert_eq!(c.timeouts.header_read, Duration::from_secs(30));
    assert_eq!(c.timeouts.idle, Duration::from_secs(60));
    assert_eq!(c.timeouts.body_progress, Duration::from_secs(60));
    assert_eq!(c.timeouts.h2_keepalive, Duration::from_secs(20));
}

#[test]
fn connection_timeouts_are_read_from_the_file_and_zero_is_refused() {
    let s = Settings {
        upstream: Some("http://127.0.0.1:5000".into()),
        ..settings()
    };
    let c = Config::from_toml(
        &s,
        "[timeouts]\nidle_secs = 7\nbody_progress_secs = 8\nh2_keepalive_secs = 9\n",
    )
    .unwrap();
    assert_eq!(c.timeouts.idle, Duration::from_secs(7));
    assert_eq!(c.timeouts.body_progress, Duration::from_secs(8));
    assert_eq!(c.timeouts.h2_keepalive, Duration::from_secs(9));

    let err = Config::from_toml(
        &s,
        "[timeouts]\nidle_secs = 0\nbody_progress_secs = 0\nh2_keepalive_secs = 0\n",
    )
    .unwrap_err()
    .to_string();
    for key in [
        "timeouts.idle_secs: must be at least 1",
        "timeouts.body_progress_secs: must be at least 1",
        "timeouts.h2_keepalive_secs: must be at least 1",
    ] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }
}

#[test]
fn flags_win_over_the_file() {
    let s = Settings {
        upstream: Some("http://flag:1".into()),
        ..settings()
    };
    let c = Config::from_toml(
        &s,
        "upstream = \"http://file:2\"\nlisten = \"0.0.0.0:7000\"\nmode = \"serve\"\n",
    )
    .unwrap();
    assert_eq!(c.upstream.origin, "http://flag:1");
    assert_eq!(c.listen.port(), 7000);
    assert_eq!(c.mode, Mode::Serve);
}

#[test]
fn every_error_is_reported_with_its_key() {
    let err = Config::from_toml(
        &settings(),
        "listen = \"nope\"\nmode = \"both\"\n[timeouts]\nconnect_secs = 0\n[merge]\npatterns = [\"{tag}\"]\n",
    )
    .unwrap_err();
    let text = err.to_string();
    for key in [
        "listen:",
        "upstream:",
        "mode:",
        "timeouts.connect_secs",
        "merge.patterns",
    ] {
        assert!(text.contains(key), "{key} missing in:\n{text}");
    }
}

#[test]
fn unknown_keys_are_refused_with_their_position() {
    let err = Config::from_toml(&settings(), "upstream = \"http://r:5000\"\nlisen = \"x\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("lisen"), "{err}");
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn upstream_must_be_an_origin() {
    for bad in ["ftp://r", "http://r:5000/v2", "r:5000"] {
        let s = Settings {
            upstream: Some(bad.into()),
            ..settings()
        };
        assert!(Config::from_toml(&s, "").is_err(), "{bad}");
    }
}

#[test]
fn merge_settings_and_aliases() {
    let c = Config::from_toml(
        &settings(),
        r#"
upstream = "https://registry.example:443"
[merge]
patterns = ["{tag}-{arch}"]
index_media_type = "oci"
platform_source = "config"
[aliases]
"windows-amd64" = "windows/amd64"
"#,
    )
    .unwrap();
    assert_eq!(c.merge.rules.default.index_format, IndexFormat::Oci);
    assert_eq!(
        c.merge.rules.default.platform_source,
        PlatformSource::Config
    );
    let m = c.merge.rules.default.match_tag("v1-windows-amd64").unwrap();
    assert_eq!(m.target, "v1");
    assert_eq!(m.platform.os, "windows");
}

#[test]
fn rules_are_read_with_every_kind() {
    let c = Config::from_toml(
        &settings(),
        r#"
upstream = "http://r:5000"
[[rules]]
repositories = ["ls/*"]
tag_patterns = ["{arch}-{tag}"]

[[rules]]
repositories = ["wg/*"]
repository_patterns = ["{repo}-{arch}"]

[[rules]]
repositories = ["req/*"]
tag_patterns = ["{arch}_{tag}"]
arches = ["amd64", "linux/arm64"]
required = ["amd64", "arm64"]
extra_targets = ["latest"]
annotations = { "org.opencontainers.image.vendor" = "example" }
index_media_type = "oci"
"#,
    )
    .unwrap();
    let rules = &c.merge.rules;
    assert_eq!(
        rules
            .for_repo("ls/app")
            .match_tag("arm64v8-1.0")
            .unwrap()
            .target,
        "1.0"
    );
    let (target, _) = rules
        .for_repo("wg/go-ui-amd64")
        .match_repository("wg/go-ui-amd64", "v1.0.2")
        .unwrap();
    assert_eq!(target, "wg/go-ui");
    let req = rules.for_repo("req/app");
    assert!(req.is_arch_tag("x86_64_v1"));
    assert!(!req.is_arch_tag("s390x_v1"));
    assert_eq!(req.required.len(), 2);
    assert_eq!(req.extra_targets, vec!["latest"]);
    assert_eq!(req.index_format, IndexFormat::Oci);
    assert_eq!(
        rules.for_repo("other").match_tag("aarch64").unwrap().target,
        "latest"
    );
}

#[test]
fn bad_rules_are_refused_with_key_and_position() {
    let err = Config::from_toml(
        &settings(),
        r#"upstream = "http://r:5000"
[[rules]]
repositories = ["a/*"]
tag_patterns = ["{tag}", "{arch}-{repo}", "{arch}"]
arches = ["amd64", "sparc99"]
required = ["s390x"]
extra_targets = ["x86_64"]
[[rules]]
repositories = ["a/*"]
repository_patterns = ["{repo}"]
"#,
    )
    .unwrap_err()
    .to_string();
    for needle in [
        "rules[0].tag_patterns: \"{tag}\"",
        "rules[0].tag_patterns: \"{arch}-{repo}\"",
        "rules[0].arches: unknown arch \"sparc99\"",
        "rules[0].required: linux/s390x is required but not in `arches`",
        "rules[0].extra_targets: \"x86_64\" is itself an arch tag",
        "rules[1].repositories: the same globs as an earlier rule",
        "rules[1].repository_patterns",
        "line 4",
    ] {
        assert!(err.contains(needle), "{needle:?} missing in:\n{err}");
    }
}

#[test]
fn serve_mode_refuses_rules_that_write() {
    let s = Settings {
        mode: Some("serve".into()),
        ..settings()
    };
    let err = Config::from_toml(
        &s,
        "upstream = \"http://r:5000\"\n[[rules]]\nrepositories = [\"a/*\"]\nextra_targets = [\"latest\"]\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("need mode = \"write\""), "{err}");
}

#[test]
fn semantic_errors_name_line_and_column() {
    let err = Config::from_toml(
        &settings(),
        "upstream = \"http://r:5000\"\n\nmode = \"both\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("mode: \"both\""), "{err}");
    assert!(err.contains("line 3, column 8"), "{err}");
}
