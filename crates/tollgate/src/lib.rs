//! Tollgate wiring.
