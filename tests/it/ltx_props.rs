//! Property tests of the LTX codec.
