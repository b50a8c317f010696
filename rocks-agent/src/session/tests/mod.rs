//! Deterministic tests of the session core: a simulated pair of agents with a virtual clock
//! (`pair`), the non-resume path (`basic`), resume and attacks on it (`resume`), and seeded
//! random fault scenarios (`random`).

mod basic;
mod pair;
mod random;
mod resume;
