//! streamgate puts Redis Streams on HTTP: producers POST messages, consumers receive them over
//! Server-Sent Events, WebSocket or long-polling.
//!
//! Code map (see ARCHITECTURE.md for the invariants):
//! - [`config`]: reads file, environment and flags into a validated [`config::Config`].
//! - [`model`]: stream names, entry ids, entries — the vocabulary every layer shares.
//! - [`auth`]: scopes, tokens and principals, independent of any transport.
//! - [`backend`]: the storage contract and its Redis and embedded implementations.
//! - [`delivery`]: consumer groups and broadcast, transport-agnostic.
//! - [`bridge`]: Redis Pub/Sub channels appended to streams.
//! - [`probe`]: the synthetic probe that readiness trusts: publish, and see it delivered.
//! - [`metrics`]: the Prometheus series.
//! - [`http`]: routes, extraction, errors as problem+json; the only layer that knows HTTP.
//! - [`app`]: wires it together and runs the server until shutdown.
//! - [`copy`]: `streamgate copy`, moving data between a data directory and Redis.

pub mod app;
pub mod auth;
pub mod backend;
pub mod bridge;
pub mod config;
pub mod copy;
pub mod delivery;
pub mod http;
pub mod metrics;
pub mod model;
pub mod probe;
pub mod telemetry;
