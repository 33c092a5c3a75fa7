//! Root package: holds the cross-crate integration tests in `tests/`.
