//! The integration harness every `tests/*.rs` file shares (`mod support;`).
//!
//! It runs the real thing: Debian's `docker-registry` (CNCF distribution 2.8)
//! on a free loopback port with its own temp dir, and the `archmerge` binary
//! cargo built for this test run in front of it. Both stop on `Drop`.
//!
//! This file is the map; each file below has one job, named by what it
//! starts or works with:
//!
//! - `process` — what every spawner shares: [`free_port`], the readiness
//!   probe ([`v2_status`], [`PROBE_AGENT`]), log files, stopping a child.
//! - `registry` — the registry: [`spawn_registry`] /
//!   [`spawn_registry_with`] ([`RegistryOpts`]: basic auth, any
//!   `REGISTRY_*` setting) and [`spawn_registry_extra`] ([`RegistryExtra`]:
//!   a fixed port, TLS, a notifications endpoint).
//! - `archmerge` — the proxy: [`spawn_archmerge`] / [`spawn_archmerge_with`]
//!   ([`ArchmergeOpts`]) and [`spawn_archmerge_tls`], with `kill_9()`,
//!   `terminate()` and `restart()` for crash tests and `log_text()` for
//!   tests that read its logs.
//! - `commands` — archmerge's one-shot commands ([`archmerge_command`]).
//! - `stack` — [`Stack`]: one registry with one archmerge in front of it
//!   and the helpers several test files share; each file adds its own in
//!   an `impl Stack` block.
//! - `faults` — a registry started again on its port and storage, raw
//!   HTTP/1.1 over a socket, a client trickling bytes (slowloris), and
//!   [`eventually`], polling until a check holds.
//! - `observe` — a process watched from outside: the registry's access
//!   log (one line per request, so a test counts what archmerge cost it),
//!   archmerge's open file descriptors and their limit, its log without
//!   colours ([`strip_ansi`]).
//! - `relay` — [`Relay`]: a real registry behind a relay that fails the
//!   requests a test names (a transient 503 on one manifest PUT).
//! - `fake` — [`FakeUpstream`], a tiny deliberately scripted HTTP/1.1
//!   server for answers a real registry cannot be told to give.
//! - `token` — registry token auth: a throwaway token service whose tokens
//!   carry exactly the repository scopes a test grants.
//! - `certs` — a test CA and a server certificate for 127.0.0.1 (rcgen).
//! - `http` — [`http()`] / [`h2c`], reqwest clients that never follow
//!   redirects (a test sees a 307 and its `Location` as a client would),
//!   response helpers, and seeding over raw HTTP ([`push_small_image`]).
//! - `auth` — htpasswd files (bcrypt) and clients that send HTTP Basic.
//! - `manifest` — manifest requests with any `Accept`, answers kept whole,
//!   the eight arches of the alias table and an index's entries.
//! - `image` — deterministic OCI image layouts with real tar layers.
//! - `digest` — `sha256:<hex>` digests ([`digest_of`]).
//! - `tools` — skopeo and docker, with timeouts and loud failures.
//! - `clients` — buildah (manifest lists) and PyPI `oras` (artifacts), each
//!   with its own storage and configuration.
//!
//! Nothing here skips: a missing binary or a registry that never comes up is
//! a panic that says what was seen.

#![allow(dead_code)] // each test file uses its own part of the harness

mod archmerge;
mod auth;
mod certs;
mod clients;
mod commands;
mod digest;
mod fake;
mod faults;
mod http;
mod image;
mod manifest;
mod observe;
mod process;
mod registry;
mod relay;
mod stack;
mod token;
mod tools;

#[allow(unused_imports)] // not every test file uses every part
pub use archmerge::*;
#[allow(unused_imports)]
pub use auth::*;
#[allow(unused_imports)]
pub use certs::*;
#[allow(unused_imports)]
pub use clients::*;
#[allow(unused_imports)]
pub use commands::*;
#[allow(unused_imports)]
pub use digest::*;
#[allow(unused_imports)]
pub use fake::*;
#[allow(unused_imports)]
pub use faults::*;
#[allow(unused_imports)]
pub use http::*;
#[allow(unused_imports)]
pub use image::*;
#[allow(unused_imports)]
pub use manifest::*;
#[allow(unused_imports)]
pub use observe::*;
#[allow(unused_imports)]
pub use process::*;
#[allow(unused_imports)]
pub use registry::*;
#[allow(unused_imports)]
pub use relay::*;
#[allow(unused_imports)]
pub use stack::*;
#[allow(unused_imports)]
pub use token::*;
#[allow(unused_imports)]
pub use tools::*;
