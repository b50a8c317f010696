//! The session protocol between two agents (sans-I/O). Being written.
