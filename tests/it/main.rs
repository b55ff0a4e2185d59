//! The one integration-test binary.

mod openapi;
