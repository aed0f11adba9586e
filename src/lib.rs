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
//! I/O at the edges, pure code in the middle:
//!
//! - `main.rs` — CLI → config → telemetry → bind → [`server::run`].
//! - [`config`] — flags, `ARCHMERGE_*` env and TOML → validated [`config::Config`].
//! - [`app`] — the state every handler shares.
//! - [`server`] — the client listener's HTTP/1.1 + HTTP/2 settings, dispatch.
//! - `listener` — the one accept loop and connection path (TLS, connection limit,
//!   first-bytes and idle timeouts, graceful shutdown) of the client and admin
//!   listeners.
//! - [`route`] — pure: `/v2/<name>/…` parsed from the right into a [`route::Route`].
//! - [`forward`] — transparent streaming pass-through, header and `Location` rewriting.
//! - [`intercept`] — manifest PUT/DELETE: forward first, then hand arch tags to merge.
//! - [`merge`] — rebuild a target from the registry; per-target locks; verify loop.
//! - [`serve`] — serve mode: synthesized indexes answered, authorized per request.
//! - [`tls`] — rustls on the listener and towards an https registry.
//! - [`upstream`] — the pooled registry client and typed registry calls.
//! - [`rules`] — pure: tag patterns and the alias table ([`rules::tags`]), per-repository
//!   rules ([`rules::repository`]).
//! - [`platform`] — pure: platform normalisation and matching.
//! - [`index`] — pure: entries → canonical index bytes + digest; manifest parsing.
//! - [`oci`] — pure: name/tag/digest grammar, OCI error codes and body.
//! - [`error`] — the request-boundary error and its response.
//! - [`body`] — the one body type for streamed and buffered bodies; the client's
//!   request body with its progress timeout.
//! - [`reconcile`] — build or repair the indexes for arch tags already in the registry.
//! - [`inspect`] — what a target lists, entry by entry.
//! - [`metrics`] — Prometheus families.
//! - [`admin`] — the admin listener: health, readiness, metrics, reconcile, webhook.
//! - [`events`] — the registry's notification webhook.
//!
//! Layering: `server` calls `forward` and `intercept`; `intercept` calls
//! `merge`; `merge` calls `upstream` and the pure modules. Nothing calls
//! back up.
//!
//! # Request lifecycle
//!
//! 1. **Route** — [`route::parse`]; an invalid name, tag or digest is
//!    answered 400 here, before the registry is asked.
//! 2. **Forward or intercept** — everything but a manifest PUT/DELETE is
//!    streamed to the registry and back ([`forward::forward`]). A manifest
//!    PUT is buffered (≤ 4 MiB, else 413) and forwarded.
//! 3. **Merge** — if the registry accepted a PUT of an arch tag, the
//!    target's index is rebuilt from the registry's arch tags and written
//!    ([`merge::Merger::after_push`]) before the client is answered.
//! 4. **Respond** — the client gets the registry's own answer to its push,
//!    whatever the merge did (a failed merge is retried in the background).
//! 5. **Log** — one line and one metric per request, in [`server::handle`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod app;
pub mod body;
pub mod config;
pub mod error;
pub mod events;
pub mod forward;
pub mod index;
pub mod inspect;
pub mod intercept;
mod listener;
pub mod merge;
pub mod metrics;
pub mod oci;
pub mod platform;
pub mod reconcile;
pub mod route;
pub mod rules;
pub mod serve;
pub mod server;
pub mod tls;
pub mod upstream;
