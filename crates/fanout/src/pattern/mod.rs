//! The shapes of parallel LLM work, each on the shared [`Executor`]:
//! limits, retries, timeouts, the deadline and cancellation apply unchanged.
//!
//! - [`vote`]: consensus over N samples (with early stopping), universal
//!   self-consistency, and N distinct options;
//! - [`sections`]: named subtasks in parallel, then an optional synthesis;
//! - [`map_reduce`]: documents chunked and mapped in parallel, then reduced,
//!   collapsing recursively to fit a token budget, citing sources;
//! - [`perspectives`]: personas review one input, then an attributed synthesis;
//! - [`workflow`]: a TOML file of templated steps that may depend on each other.
//!
//! [`Executor`]: crate::Executor

mod asked;
pub mod extract;
pub mod map_reduce;
pub mod perspectives;
pub mod sections;
pub mod vote;
pub mod workflow;
