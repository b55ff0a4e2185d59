//! leadgate: receive sales leads from forms, ad platforms and partners, queue them durably and
//! deliver each one exactly once to Onpipeline's `Leadsin` endpoint.
//!
//! The road of a lead, one module per step:
//! receive ([`http`]) → verify and parse ([`sources`]) → map and validate ([`mapping`], [`lead`])
//! → dedupe and enqueue ([`queue`]) → answer; later lease → deliver ([`forwarder`],
//! [`onpipeline`]) → ack, retry later ([`retry`]) or dead-letter. Meta leads are read from the
//! Graph API ([`graph`]) by the forwarder, and listed periodically by [`backfill`].
#![forbid(unsafe_code)]

pub mod admin_client;
pub mod app;
pub mod backfill;
pub mod config;
pub mod error;
pub mod forwarder;
pub mod graph;
pub mod http;
pub mod lead;
pub mod mapping;
pub mod onpipeline;
pub mod queue;
pub mod retry;
pub mod sim;
pub mod sources;
pub mod telemetry;
pub mod tls;
