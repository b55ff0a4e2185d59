//! The one integration-test binary: real parts only (a `redis-server` per test, SQLite in a
//! temp dir, loopback HTTP). Shared set-up lives in `helpers`.

mod helpers;
mod queue_contract;
