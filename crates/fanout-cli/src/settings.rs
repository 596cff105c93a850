//! Where the command's settings come from: flags override the environment, the
//! environment overrides the config file's profile.
//!
//! The config file (`--config`, `$FANOUT_CONFIG`, or
//! `$XDG_CONFIG_HOME/fanout/config.toml`, by default `~/.config/fanout/config.toml`):
//!
//! ```toml
//! default_profile = "openai"
//!
//! [profiles.openai]
//! provider = "openai"
//! model = "gpt-4o-mini"
//! api_key_env = "OPENAI_API_KEY"   # the name of the variable, never the key
//! concurrency = 64
//! rpm = 500
//! tpm = 200000
//! price_input = 0.15               # per million tokens
//! price_output = 0.60
//! hedge = true                     # duplicate stragglers (default); false turns it off
//! hedge_budget = 0.05              # at most this share of extra calls
//! hedge_after = 10.0               # seconds without a sign of life [default: learned]
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fanout::{HedgePolicy, Price};
use serde::{Deserialize, Serialize};

/// The local provider's model name; any other `--model` value is a GGUF path.
pub const LOCAL_MODEL: &str = "smollm2-135m-instruct";

/// Which provider answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Any OpenAI-compatible endpoint (OPENAI_BASE_URL, OPENAI_API_KEY).
    Openai,
    /// Anthropic's Messages API (ANTHROPIC_BASE_URL, ANTHROPIC_API_KEY).
    Anthropic,
    /// fanout's in-process mock: deterministic answers, no network (for trials and tests).
    Mock,
    /// The embedded model (SmolLM2-135M-Instruct, or the GGUF file given as --model),
    /// in-process and offline: the default when no provider or API key is configured.
    Local,
}

impl ProviderKind {
    fn key_env(self) -> &'static str {
        match self {
            Self::Openai => "OPENAI_API_KEY",
            Self::Anthropic => "ANTHROPIC_API_KEY",
            Self::Mock | Self::Local => "",
        }
    }

    fn default_model(self) -> &'static str {
        match self {
            Self::Openai => "gpt-4o-mini",
            Self::Anthropic => "claude-3-5-haiku-latest",
            Self::Mock => "mock-1",
            Self::Local => LOCAL_MODEL,
        }
    }
}

/// The options every command shares (flags; all optional).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Flags {
    /// Config file with named profiles [default: ~/.config/fanout/config.toml]
    #[arg(long, global = true, env = "FANOUT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Profile of the config file to use
    #[arg(long, global = true, env = "FANOUT_PROFILE")]
    pub profile: Option<String>,
    #[arg(long, global = true, value_enum, env = "FANOUT_PROVIDER")]
    pub provider: Option<ProviderKind>,
    #[arg(long, global = true, env = "FANOUT_MODEL")]
    pub model: Option<String>,
    /// API base URL (overrides OPENAI_BASE_URL / ANTHROPIC_BASE_URL)
    #[arg(long, global = true)]
    pub base_url: Option<String>,
    /// Calls in flight at once [default: 16]
    #[arg(short = 'c', long, global = true)]
    pub concurrency: Option<usize>,
    /// Requests per minute
    #[arg(long, global = true)]
    pub rpm: Option<u64>,
    /// Tokens per minute (prompt + max output, corrected by reported usage)
    #[arg(long, global = true)]
    pub tpm: Option<u64>,
    /// Seconds one attempt may take [default: 120]
    #[arg(long, global = true)]
    pub attempt_timeout: Option<f64>,
    /// Seconds the whole run may take; then it stops and keeps what finished
    #[arg(long, global = true)]
    pub deadline: Option<f64>,
    /// Retries after the first attempt, for retryable errors [default: 4]
    #[arg(long, global = true)]
    pub retries: Option<u32>,
    #[arg(long, global = true)]
    pub temperature: Option<f32>,
    #[arg(long, global = true)]
    pub max_tokens: Option<u32>,
    /// Compute threads of the local model [default: one per core]
    #[arg(long, global = true, env = "FANOUT_THREADS")]
    pub threads: Option<usize>,
    /// Duplicate calls that straggle (on by default): past the learned p95 (and
    /// twice the median) without a sign of life, within the hedge budget
    #[arg(long, global = true, overrides_with = "no_hedge")]
    pub hedge: bool,
    /// Never duplicate a call
    #[arg(long, global = true)]
    pub no_hedge: bool,
    /// Extra calls hedging may add, as a share of all calls [default: 0.05]
    #[arg(long, global = true, value_name = "SHARE")]
    pub hedge_budget: Option<f64>,
    /// Seconds without a sign of life after which a call is hedged [default: learned]
    #[arg(long, global = true, value_name = "SECS")]
    pub hedge_after: Option<f64>,
    /// Machine-readable output: JSON results and a JSON summary
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bar and no summary
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// The job store [default: $FANOUT_HOME/fanout.db or ~/.local/share/fanout/fanout.db]
    #[arg(long, global = true, env = "FANOUT_STORE")]
    pub store: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    default_profile: Option<String>,
    #[serde(default)]
    profiles: BTreeMap<String, Profile>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Profile {
    provider: Option<ProviderKind>,
    model: Option<String>,
    base_url: Option<String>,
    api_key_env: Option<String>,
    concurrency: Option<usize>,
    rpm: Option<u64>,
    tpm: Option<u64>,
    attempt_timeout: Option<f64>,
    deadline: Option<f64>,
    retries: Option<u32>,
    temperature: Option<f32>,
    max_tokens: Option<u32>,
    threads: Option<usize>,
    price_input: Option<f64>,
    price_output: Option<f64>,
    hedge: Option<bool>,
    hedge_budget: Option<f64>,
    hedge_after: Option<f64>,
}

/// Everything resolved: what to call and how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub provider: ProviderKind,
    pub model: String,
    pub base_url: Option<String>,
    pub api_key_env: String,
    pub concurrency: usize,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub attempt_timeout: f64,
    pub deadline: Option<f64>,
    pub retries: u32,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
    /// Compute threads of the local model.
    #[serde(default)]
    pub threads: Option<usize>,
    pub price: Option<Price>,
    /// Hedging of stragglers; `None` is off.
    #[serde(default = "Hedging::default_on")]
    pub hedge: Option<Hedging>,
}

/// How stragglers are hedged.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hedging {
    /// Extra calls, as a share of all calls.
    pub budget: f64,
    /// Seconds without a sign of life; `None` learns it from the run.
    pub after: Option<f64>,
}

impl Default for Hedging {
    /// The library's default: a learned threshold, 5% extra calls at most.
    fn default() -> Self {
        Self { budget: HedgePolicy::default().budget, after: None }
    }
}

impl Hedging {
    /// Jobs stored before hedging was a setting hedge by default too.
    fn default_on() -> Option<Self> {
        Some(Self::default())
    }

    pub fn policy(self) -> HedgePolicy {
        let policy = match self.after {
            Some(after) => HedgePolicy::after(Duration::from_secs_f64(after.max(0.0))),
            None => HedgePolicy::default(),
        };
        policy.with_budget(self.budget)
    }
}

fn default_config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("fanout/config.toml"))
}

/// The default job store.
pub fn default_store() -> PathBuf {
    if let Some(home) = std::env::var_os("FANOUT_HOME") {
        return PathBuf::from(home).join("fanout.db");
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("fanout/fanout.db")
}

fn read_config(path: &Path) -> Result<ConfigFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config file {} is not valid", path.display()))
}

/// Flags over the profile over the default (on, learned threshold, 5%).
fn hedging(flags: &Flags, profile: &Profile) -> Result<Option<Hedging>> {
    let on = if flags.no_hedge {
        false
    } else if flags.hedge {
        true
    } else {
        profile.hedge.unwrap_or(true)
    };
    let budget = flags.hedge_budget.or(profile.hedge_budget);
    if let Some(budget) = budget.filter(|b| !(0.0..=1.0).contains(b)) {
        bail!("--hedge-budget must be a share between 0 and 1, not {budget}");
    }
    Ok(on.then(|| Hedging {
        budget: budget.unwrap_or(Hedging::default().budget),
        after: flags.hedge_after.or(profile.hedge_after),
    }))
}

pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl Settings {
    pub fn resolve(flags: &Flags) -> Result<Self> {
        let config = match &flags.config {
            Some(path) => read_config(path)?,
            None => match default_config_path().filter(|p| p.exists()) {
                Some(path) => read_config(&path)?,
                None => ConfigFile::default(),
            },
        };
        let profile = match flags.profile.as_ref().or(config.default_profile.as_ref()) {
            Some(name) => config
                .profiles
                .get(name)
                .cloned()
                .with_context(|| format!("no profile `{name}` in the config file"))?,
            None => Profile::default(),
        };
        let provider = match flags.provider.or(profile.provider) {
            Some(provider) => provider,
            None if env("OPENAI_API_KEY").is_some() => ProviderKind::Openai,
            None if env("ANTHROPIC_API_KEY").is_some() => ProviderKind::Anthropic,
            // Nothing configured: the embedded model, so fanout works offline.
            None => ProviderKind::Local,
        };
        let base_url_env = match provider {
            ProviderKind::Openai => env("OPENAI_BASE_URL"),
            ProviderKind::Anthropic => env("ANTHROPIC_BASE_URL"),
            ProviderKind::Mock | ProviderKind::Local => None,
        };
        let hedge = hedging(flags, &profile)?;
        let price = match (profile.price_input, profile.price_output) {
            (None, None) => None,
            (input, output) => Some(Price {
                input_per_million: input.unwrap_or(0.0),
                output_per_million: output.unwrap_or(0.0),
            }),
        };
        Ok(Self {
            provider,
            model: flags
                .model
                .clone()
                .or(profile.model)
                .unwrap_or_else(|| provider.default_model().into()),
            base_url: flags.base_url.clone().or(base_url_env).or(profile.base_url),
            api_key_env: profile.api_key_env.unwrap_or_else(|| provider.key_env().into()),
            concurrency: flags.concurrency.or(profile.concurrency).unwrap_or(16).max(1),
            rpm: flags.rpm.or(profile.rpm),
            tpm: flags.tpm.or(profile.tpm),
            attempt_timeout: flags.attempt_timeout.or(profile.attempt_timeout).unwrap_or(120.0),
            deadline: flags.deadline.or(profile.deadline),
            retries: flags.retries.or(profile.retries).unwrap_or(4),
            temperature: flags.temperature.or(profile.temperature),
            max_tokens: flags.max_tokens.or(profile.max_tokens),
            threads: flags.threads.or(profile.threads).filter(|t| *t > 0),
            price,
            hedge,
        })
    }

    /// Takes the run limits (not what shapes answers) given as flags now: a
    /// resumed job may run with more concurrency or another deadline.
    pub fn with_run_limits(mut self, flags: &Flags) -> Self {
        self.concurrency = flags.concurrency.unwrap_or(self.concurrency).max(1);
        self.rpm = flags.rpm.or(self.rpm);
        self.tpm = flags.tpm.or(self.tpm);
        self.attempt_timeout = flags.attempt_timeout.unwrap_or(self.attempt_timeout);
        self.deadline = flags.deadline.or(self.deadline);
        self.retries = flags.retries.unwrap_or(self.retries);
        self.threads = flags.threads.filter(|t| *t > 0).or(self.threads);
        if flags.no_hedge {
            self.hedge = None;
        } else if flags.hedge || flags.hedge_budget.is_some() || flags.hedge_after.is_some() {
            let mut hedge = self.hedge.unwrap_or_default();
            hedge.budget = flags.hedge_budget.unwrap_or(hedge.budget);
            hedge.after = flags.hedge_after.or(hedge.after);
            self.hedge = Some(hedge);
        }
        self
    }
}
