//! The crosswire browser client (placeholder until the client issue lands).
