//! The integration-test binary.

mod sim;
