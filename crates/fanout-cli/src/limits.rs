//! `--limits redis://…`: the job's limits shared with every process given
//! the same Redis (other `fanout batch` runs, shards, machines): `--rpm` and
//! `--tpm` are then the total of all of them, a 429 pauses all of them, and
//! `--global-concurrency` caps their calls in flight together.

use std::sync::Arc;

use anyhow::Result;
use fanout::{Rate, SharedLimits};
use fanout_queue::{LimitsConfig, RedisLimits};

use crate::Refusal;
use crate::settings::Settings;

/// Where the limits are shared, and the caps only a shared limiter has.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct SharedLimitsArgs {
    /// Share the limits through this Redis (`redis://host:6379/0`) with every
    /// process given it: --rpm and --tpm are then everyone's total, a 429
    /// pauses everyone, and --global-concurrency caps everyone's calls in flight
    #[arg(long, value_name = "URL", env = "FANOUT_LIMITS", hide_env_values = true)]
    pub limits: Option<String>,
    /// With --limits: the most calls in flight at once, all processes together
    #[arg(long, value_name = "N", requires = "limits")]
    pub global_concurrency: Option<usize>,
    /// With --limits: which processes share them [default: those calling the
    /// same provider, endpoint and model]
    #[arg(long, value_name = "NAME", requires = "limits")]
    pub limits_scope: Option<String>,
}

/// The scope processes share when none is named: one provider's endpoint and
/// model (never its key). The endpoint is hashed: an address may hold a
/// user and password, and key names are visible to anyone reading Redis.
fn default_scope(settings: &Settings) -> String {
    let provider = serde_json::to_value(settings.provider).ok();
    let provider = provider.as_ref().and_then(|p| p.as_str()).unwrap_or("provider");
    let endpoint = settings.base_url.as_deref().unwrap_or("default");
    let endpoint = &crate::fingerprint::sha256(endpoint.as_bytes())[..16];
    format!("{provider}:{}:{endpoint}", settings.model)
}

impl SharedLimitsArgs {
    /// The shared limiter, connected (an unreachable Redis is exit 2, before
    /// any call); `None` without `--limits`.
    pub async fn connect(
        &self,
        settings: &Settings,
        quiet: bool,
    ) -> Result<Option<Arc<dyn SharedLimits>>> {
        let Some(url) = &self.limits else { return Ok(None) };
        let mut config =
            LimitsConfig::new(self.limits_scope.clone().unwrap_or_else(|| default_scope(settings)));
        config.rpm = settings.rpm.map(|rpm| fanout_queue::leave_slack(Rate::per_minute(rpm)));
        config.tpm = settings.tpm.map(|tpm| Rate::per_minute(tpm).with_burst(tpm));
        config.max_in_flight = self.global_concurrency.map(|n| n.max(1));
        let notices: fanout_queue::Notices = Arc::new(move |notice: &str| {
            if !quiet {
                eprintln!("fanout: {notice}");
            }
        });
        let limits =
            RedisLimits::connect(url, config, notices).await.map_err(|e| Refusal(e.into()))?;
        Ok(Some(Arc::new(limits)))
    }
}
