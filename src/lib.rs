//! archmerge: a reverse proxy in front of an OCI registry that turns
//! per-architecture pushes into multi-arch images.
//!
//! A CI job on an arm64 runner pushes `myapp:aarch64_v1.2`, another on amd64
//! pushes `myapp:x86_64_v1.2`; archmerge keeps `myapp:v1.2` as an image index
//! listing both, rebuilt from the registry on every arch push, so
//! `docker pull myapp:v1.2` works everywhere. Every other request passes
//! through untouched and streamed.
//!
//! # Layout
//!
//! I/O at the edges, pure code in the middle. The request path, in the order
//! a request meets it:
//!
//! - `main.rs` — CLI → config → telemetry → bind → [`server::run`].
//! - [`server`] — the listener: accept, TLS, HTTP/1.1 + HTTP/2, routing of
//!   each request to forward, intercept or serve; the one log line.
//! - `listener` — the one accept loop and connection path of the client and
//!   admin listeners: TLS, connection limit, first-bytes and idle timeouts,
//!   graceful shutdown.
//! - [`route`] — pure: `/v2/<name>/…` parsed from the right into a [`route::Route`].
//! - [`forward`] — transparent streaming pass-through, header and `Location` rewriting.
//! - `splice` — zero-copy blob downloads and uploads: on plaintext
//!   HTTP/1.1, a blob's body moves between the registry's socket and the
//!   client's by `splice(2)`.
//! - [`intercept`] — manifest PUT/DELETE: forward first, then ask the rules what
//!   the write touches and bring those targets up to date.
//! - [`serve`] — serve mode: synthesized indexes answered, authorized per request.
//!
//! The write model, below the handlers:
//!
//! - [`app`] — the state every handler shares, and the mode as one type
//!   ([`app::Indexes`]: write or serve) with `after_write`.
//! - [`rules`] — pure: tag patterns and aliases ([`rules::tags`]), per-repository
//!   rules ([`rules::repository`]), and what a write touches ([`rules::write`]).
//! - [`merge`] — [`merge::Merger::update`], the one entry point: snapshot and
//!   facts read from the registry, a pure decision ([`merge::decide`]), the
//!   write, the verification; per-target locks and background retries.
//! - [`index`] — pure: entries → canonical index bytes + digest; manifest parsing.
//! - [`platform`] — pure: platform normalisation and matching.
//! - [`upstream`] — the pooled registry client and typed registry calls.
//! - [`bounded`] — every fan-out's concurrency limit, and backoff.
//!
//! Operations and the rest:
//!
//! - [`config`] — flags, `ARCHMERGE_*` env and TOML → validated [`config::Config`].
//! - [`admin`] — the admin listener: health, readiness, metrics, reconcile, webhook.
//! - [`events`] — the registry's notification webhook and its bounded queue.
//! - [`reconcile`] — build or repair the indexes for arch tags already in the registry.
//! - [`inspect`] — what a target lists, entry by entry.
//! - [`oci`] — pure: name/tag/digest grammar, OCI error codes and body.
//! - [`error`] — the request-boundary error and its response.
//! - [`body`] — the one body type for streamed and buffered bodies.
//! - [`metrics`] — Prometheus families.
//! - [`logs`] — the text log format, with the per-request access line written directly.
//! - [`tls`] — rustls on the listener and towards an https registry.
//!
//! Layering: `server` calls `forward`, `intercept` and `serve`; those call
//! `app` (the mode) and `rules`; `app` calls `merge` and `reconcile`; `merge`
//! calls `upstream` and the pure modules. Nothing calls back up.
//!
//! # Request lifecycle
//!
//! 1. **Route** — [`route::parse`]; an invalid name, tag or digest is
//!    answered 400 here, before the registry is asked.
//! 2. **Forward or intercept** — everything but a manifest PUT/DELETE (and,
//!    in serve mode, a manifest GET/HEAD) is streamed to the registry and
//!    back ([`forward::forward`]). A manifest PUT is buffered (≤ 4 MiB, else
//!    413; within a global budget, else 503) and forwarded.
//! 3. **What it touches** — if the registry accepted the write,
//!    [`rules::Rule::touches`] says which targets it touches and how (an arch
//!    tag changed, a new base at the target, the target deleted).
//! 4. **Merge** — [`app::Indexes::after_write`] brings each up to date
//!    ([`merge::Merger::update`]) before the client is answered.
//! 5. **Respond** — the client gets the registry's own answer to its write,
//!    whatever the merge did (a failed merge is said in a `Warning` and
//!    retried in the background).
//! 6. **Log** — one line and one metric per request, in [`server::handle`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod app;
pub(crate) mod body;
pub(crate) mod bounded;
pub mod config;
pub(crate) mod error;
pub(crate) mod events;
pub(crate) mod forward;
pub mod index;
pub(crate) mod inspect;
pub(crate) mod intercept;
mod listener;
pub mod logs;
pub(crate) mod merge;
pub(crate) mod metrics;
pub mod oci;
pub mod platform;
pub(crate) mod reconcile;
pub mod route;
pub mod rules;
pub(crate) mod serve;
pub mod server;
pub(crate) mod splice;
pub(crate) mod tls;
pub(crate) mod upstream;
