//! `archmerge::route::parse` on any request path: never panics; a route that
//! names a repository names a valid one (so never `..`, `%2e%2e` or an
//! empty component) and a valid tag or digest; and a path built from a
//! valid name and tag parses back to exactly them.

#![no_main]

use archmerge::oci::{is_valid_digest, is_valid_name, is_valid_tag};
use archmerge::route::{parse, Reference, Route};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    match parse(path) {
        Ok(route) => {
            let name = match &route {
                Route::Manifest { name, reference } => {
                    match reference {
                        Reference::Tag(t) => assert!(is_valid_tag(t), "tag {t:?}"),
                        Reference::Digest(d) => assert!(is_valid_digest(d), "digest {d:?}"),
                    }
                    Some(name)
                }
                Route::Blob { name }
                | Route::Upload { name }
                | Route::Tags { name }
                | Route::Referrers { name } => Some(name),
                Route::Base | Route::Catalog | Route::Other => None,
            };
            if let Some(name) = name {
                assert!(path.starts_with("/v2/"), "{path:?}");
                assert!(is_valid_name(name), "name {name:?} from {path:?}");
                assert!(
                    !name.split('/').any(|c| c.is_empty() || c == "." || c == ".."),
                    "name {name:?}"
                );
                assert!(path[4..].starts_with(name.as_str()), "{name:?} from {path:?}");
            }
            assert!(!route.kind().is_empty());
        }
        Err(e) => assert!(!e.message.is_empty()),
    }

    // Round trip: name and tag split at the first space.
    if let Some((name, tag)) = path.split_once(' ') {
        if is_valid_name(name) && is_valid_tag(tag) {
            let built = format!("/v2/{name}/manifests/{tag}");
            assert_eq!(
                parse(&built).ok(),
                Some(Route::Manifest {
                    name: name.to_owned(),
                    reference: Reference::Tag(tag.to_owned()),
                }),
                "{built:?}"
            );
        }
    }
});
