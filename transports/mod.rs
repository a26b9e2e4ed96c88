//! Transport implementations.
