//! Litestream 0.5.17 reads what we write.
