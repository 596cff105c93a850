//! fanout beyond one process, on Redis.
//!
//! [`RedisLimits`] is a [`fanout::SharedLimits`]: every executor that admits
//! its calls through one (in one process or many, on one machine or many)
//! stays within one requests-per-minute and tokens-per-minute budget, pauses
//! with the others on a 429, and holds at most a global number of calls in
//! flight. `fanout batch --limits redis://…` uses it.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use fanout::{Executor, MockProvider, Rate};
//! use fanout_queue::{LimitsConfig, RedisLimits};
//!
//! let mut config = LimitsConfig::new("my-org-gpt-4o");
//! config.rpm = Some(Rate::per_minute(6_000));
//! config.max_in_flight = Some(64);
//! let limits = RedisLimits::connect("redis://127.0.0.1:6379/0", config, Arc::new(|notice: &str| eprintln!("{notice}"))).await?;
//! let executor = Executor::builder(MockProvider::new()).shared_limits(Arc::new(limits)).build();
//! # Ok(()) }
//! ```

mod limits;
mod queue;
pub mod server;

pub use limits::{LimitsConfig, LimitsError, Notices, RedisLimits, leave_slack, redacted};
pub use queue::{Answer, FORMAT, JobMeta, JobQueue, QueueError, QueuedResult, QueuedTask};
