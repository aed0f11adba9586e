//! Index synthesis from fuzz-built entry sets: `build_index` is canonical
//! (see `archmerge_fuzz::check_canonical`): any order gives the same bytes,
//! the output parses, rebuilding from it gives the same bytes, and a
//! platform that a managed entry provides is listed once.

#![no_main]

use archmerge_fuzz::{check_canonical, Case};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|case: Case| {
    check_canonical(&case);
});
