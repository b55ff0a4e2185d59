//! Source kinds: each verifies a raw request and parses it into inbound fields.
pub mod body;
