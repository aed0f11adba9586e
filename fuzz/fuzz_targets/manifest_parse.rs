//! Manifest and image-config parsing on any bytes (first line: the
//! Content-Type the registry sent; the rest: the body). Never panics; an
//! index that parses can be read as a target and flattened, and whatever
//! archmerge builds from it is canonical (rebuilding from its own output
//! gives the same bytes).

#![no_main]

use std::collections::BTreeMap;

use archmerge::index::{
    build_index, flatten, index_entries, parse_config_platform, parse_manifest,
    read_target_index, sha256_digest, IndexFormat, Manifest,
};
use archmerge::platform::Platform;
use archmerge_fuzz::reread;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (content_type, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (std::str::from_utf8(&data[..i]).ok(), &data[i + 1..]),
        None => (None, data),
    };
    let _ = parse_config_platform(data);
    let _ = parse_config_platform(body);
    for ct in [content_type, None] {
        match parse_manifest(ct, body) {
            Ok(Manifest::Index(index)) => {
                assert!(index.media_type().is_some(), "an index without mediaType");
                let digest = sha256_digest(body);
                let _ = read_target_index(&digest, &index);
                for p in ["linux/amd64", "linux/arm64/v8", "windows/amd64"] {
                    let _ = flatten(&index, &Platform::parse(p).unwrap().key());
                }
                let entries = index_entries(&digest, &index);
                for format in [IndexFormat::Auto, IndexFormat::Oci] {
                    let Ok(built) = build_index(&entries, format, &BTreeMap::new()) else {
                        continue;
                    };
                    let again = reread(&built).unwrap_or_else(|e| panic!("{e}"));
                    let rebuilt = build_index(&again, format, &BTreeMap::new())
                        .unwrap_or_else(|e| panic!("rebuilding failed: {e}"));
                    assert_eq!(
                        String::from_utf8_lossy(&built.bytes),
                        String::from_utf8_lossy(&rebuilt.bytes),
                        "rebuilding from archmerge's own output changed the bytes"
                    );
                }
            }
            Ok(Manifest::Image(info)) => {
                assert!(info.config_digest.contains(':'), "{info:?}");
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
});
