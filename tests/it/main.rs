//! The one integration-test binary: the real gateway over real HTTP, a real Onpipeline
//! simulator over HTTPS, a real `redis-server` per test, a real headless Chromium. Shared
//! set-up lives in `helpers`, named after what tests do with it.

mod abuse;
mod admin;
mod bad_input;
mod browser;
mod cli;
mod cors;
mod delivery;
mod durability;
mod egress;
mod faults;
mod forms;
mod google;
mod helpers;
mod logging;
mod meta;
mod metrics;
mod metrics_series;
mod openapi;
mod partner;
mod privacy;
mod queue_contract;
mod redis_modes;
mod sim;
mod webhooks;
