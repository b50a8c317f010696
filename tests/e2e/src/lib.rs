//! Test harness for end-to-end tests. Being written.
