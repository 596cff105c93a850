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
//! price_input = 0.15               # per million tokens [default: data/prices.toml]
//! price_output = 0.60
//! hedge = true                     # duplicate stragglers (default); false turns it off
//! hedge_budget = 0.05              # at most this share of extra calls
//! hedge_after = 10.0               # seconds without a sign of life [default: learned]
//! budget = 5.00                    # dollars at most, a job's runs together
//! max_total_tokens = 2000000       # tokens at most
//!
//! [mcp.docs]                       # tools for `--tools docs` (stdio: command, args, env)
//! command = "npx"
//! args = ["-y", "@modelcontextprotocol/server-filesystem", "./docs"]
//!
//! [mcp.search]                     # or a streamable HTTP server
//! url = "http://127.0.0.1:8931/mcp"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fanout::agent::mcp::McpConfig;
use fanout::prices::PriceTable;
use fanout::{HedgePolicy, Price, SpendLimit, Usage};
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
    /// What to call and how: the same settings a profile may hold.
    #[command(flatten)]
    pub choices: Choices,
    /// Never duplicate a call (overrides --hedge and the profile)
    #[arg(long, global = true)]
    pub no_hedge: bool,
    /// Machine-readable output: JSON results and a JSON summary
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bar and no summary
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// The job store [default: $FANOUT_HOME/fanout.db or ~/.local/share/fanout/fanout.db]
    #[arg(long, global = true, env = "FANOUT_STORE")]
    pub store: Option<PathBuf>,
    /// Goes on in this pattern job, answering what it answered before from
    /// it (what `fanout jobs resume` runs)
    #[arg(long, global = true, hide = true, value_name = "JOB")]
    pub resume_job: Option<String>,
}

/// Every setting, declared once: as a flag (`--max-tokens`) and as a config
/// file's profile key (`max_tokens`). Flags win over the environment, which
/// wins over the profile ([`Choices::over`]); what is still unset takes the
/// defaults in [`Settings::resolve`].
#[derive(Clone, Debug, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Choices {
    #[arg(long, global = true, value_enum, env = "FANOUT_PROVIDER")]
    pub provider: Option<ProviderKind>,
    #[arg(long, global = true, env = "FANOUT_MODEL")]
    pub model: Option<String>,
    /// API base URL (overrides OPENAI_BASE_URL / ANTHROPIC_BASE_URL)
    #[arg(long, global = true)]
    pub base_url: Option<String>,
    /// The environment variable that holds the API key (its name, never the key)
    /// [default: OPENAI_API_KEY or ANTHROPIC_API_KEY]
    #[arg(long, global = true, value_name = "VAR")]
    pub api_key_env: Option<String>,
    /// Calls in flight at once [default: 16]
    #[arg(short = 'c', long, global = true)]
    pub concurrency: Option<usize>,
    /// Requests per minute
    #[arg(long, global = true)]
    pub rpm: Option<u64>,
    /// Tokens per minute (prompt + max output, corrected by reported usage)
    #[arg(long, global = true)]
    pub tpm: Option<u64>,
    /// Seconds one attempt may go without a sign of life [default: 120]
    #[arg(long, global = true)]
    pub attempt_timeout: Option<f64>,
    /// How long the whole run may take, in seconds or as `90m`, `6h`; then it
    /// stops and keeps what finished
    #[arg(long, global = true, value_parser = seconds, value_name = "SECONDS")]
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
    /// Memory for the local model's KV cache, e.g. `2GiB`; requests wait for
    /// room in it [default: half the memory available at start]
    #[arg(long, global = true, env = "FANOUT_KV_MEMORY", value_name = "SIZE")]
    pub kv_memory: Option<bytesize::ByteSize>,
    /// Price of a million input tokens [default: the built-in table's price of the model]
    #[arg(long, global = true, value_name = "PRICE", visible_alias = "price-in")]
    pub price_input: Option<f64>,
    /// Price of a million output tokens [default: the built-in table's]
    #[arg(long, global = true, value_name = "PRICE", visible_alias = "price-out")]
    pub price_output: Option<f64>,
    /// The most the calls may cost, in dollars at the model's price; a job's
    /// earlier runs count. When the next call could exceed it, no call starts
    /// and the run ends with exit 4 (resume with a larger --budget)
    #[arg(long, global = true, value_name = "DOLLARS")]
    pub budget: Option<f64>,
    /// The most tokens the calls may use, input and output together (a job's
    /// earlier runs count)
    #[arg(long, global = true, value_name = "TOKENS")]
    pub max_total_tokens: Option<u64>,
    /// With a JSON Schema: answers that break it are sent back with the errors
    /// this many times per row before the row fails [default: 2]
    #[arg(long, global = true, value_name = "N")]
    pub schema_repairs: Option<u32>,
    /// Ask again when an answer is cut off at --max-tokens (within --retries),
    /// with max_tokens times FACTOR [default when given alone: 2]
    #[arg(
        long,
        global = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "2",
        value_name = "FACTOR"
    )]
    pub retry_truncated: Option<f64>,
    /// Duplicate calls that straggle (on by default): past the learned p95 (and
    /// twice the median) without a sign of life, within the hedge budget;
    /// `--hedge=false` turns it off
    #[arg(
        long,
        global = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_name = "BOOL"
    )]
    pub hedge: Option<bool>,
    /// Extra calls hedging may add, as a share of all calls [default: 0.05]
    #[arg(long, global = true, value_name = "SHARE")]
    pub hedge_budget: Option<f64>,
    /// Seconds without a sign of life after which a call is hedged [default: learned]
    #[arg(long, global = true, value_name = "SECS")]
    pub hedge_after: Option<f64>,
}

/// A duration flag: seconds (`90`, `1.5`) or a duration with its unit (`6h`, `90m`, `1h 30m`).
fn seconds(text: &str) -> Result<f64, String> {
    if let Ok(seconds) = text.trim().parse::<f64>() {
        return Ok(seconds);
    }
    humantime::parse_duration(text.trim())
        .map(|d| d.as_secs_f64())
        .map_err(|e| format!("`{text}` is neither seconds nor a duration like 90m or 6h: {e}"))
}

impl Choices {
    /// These choices, with `fallback`'s where these leave one unset.
    fn over(self, fallback: Self) -> Self {
        Self {
            provider: self.provider.or(fallback.provider),
            model: self.model.or(fallback.model),
            base_url: self.base_url.or(fallback.base_url),
            api_key_env: self.api_key_env.or(fallback.api_key_env),
            concurrency: self.concurrency.or(fallback.concurrency),
            rpm: self.rpm.or(fallback.rpm),
            tpm: self.tpm.or(fallback.tpm),
            attempt_timeout: self.attempt_timeout.or(fallback.attempt_timeout),
            deadline: self.deadline.or(fallback.deadline),
            retries: self.retries.or(fallback.retries),
            temperature: self.temperature.or(fallback.temperature),
            max_tokens: self.max_tokens.or(fallback.max_tokens),
            threads: self.threads.or(fallback.threads),
            kv_memory: self.kv_memory.or(fallback.kv_memory),
            price_input: self.price_input.or(fallback.price_input),
            price_output: self.price_output.or(fallback.price_output),
            budget: self.budget.or(fallback.budget),
            max_total_tokens: self.max_total_tokens.or(fallback.max_total_tokens),
            schema_repairs: self.schema_repairs.or(fallback.schema_repairs),
            retry_truncated: self.retry_truncated.or(fallback.retry_truncated),
            hedge: self.hedge.or(fallback.hedge),
            hedge_budget: self.hedge_budget.or(fallback.hedge_budget),
            hedge_after: self.hedge_after.or(fallback.hedge_after),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    default_profile: Option<String>,
    #[serde(default)]
    profiles: BTreeMap<String, Choices>,
    /// MCP servers that `--tools NAME` may name.
    #[serde(default)]
    mcp: BTreeMap<String, McpConfig>,
}

impl ConfigFile {
    /// The file `--config` (or `$FANOUT_CONFIG`) names, else the default one if it exists.
    fn load(flags: &Flags) -> Result<Self> {
        match &flags.config {
            Some(path) => read_config(path),
            None => match default_config_path().filter(|p| p.exists()) {
                Some(path) => read_config(&path),
                None => Ok(Self::default()),
            },
        }
    }
}

/// The MCP servers the config file declares (`[mcp.NAME]`), by name.
pub fn mcp_servers(flags: &Flags) -> Result<BTreeMap<String, McpConfig>> {
    Ok(ConfigFile::load(flags)?.mcp)
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
    /// Bytes of the local model's KV cache; `None`: the engine's default.
    #[serde(default)]
    pub kv_memory: Option<u64>,
    pub price: Option<Price>,
    /// Whether `price` was given (flags or profile keys) rather than looked up
    /// for `model`: a proxy takes a given price for every model its clients name.
    #[serde(skip)]
    pub price_given: bool,
    /// The most the calls may cost (a job's runs together), at `price`.
    #[serde(default)]
    pub budget: Option<f64>,
    /// The most tokens the calls may use (a job's runs together).
    #[serde(default)]
    pub max_total_tokens: Option<u64>,
    /// Repairs of answers that break the schema, per row.
    #[serde(default)]
    pub schema_repairs: Option<u32>,
    /// Truncated answers asked again, with max_tokens times this.
    #[serde(default)]
    pub retry_truncated: Option<f64>,
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

/// The chosen hedging over the default (on, learned threshold, 5%).
fn hedging(choices: &Choices, off: bool) -> Result<Option<Hedging>> {
    check_hedge_budget(choices.hedge_budget)?;
    let on = !off && choices.hedge.unwrap_or(true);
    Ok(on.then(|| Hedging {
        budget: choices.hedge_budget.unwrap_or(Hedging::default().budget),
        after: choices.hedge_after,
    }))
}

fn check_hedge_budget(budget: Option<f64>) -> Result<()> {
    if let Some(budget) = budget.filter(|b| !(0.0..=1.0).contains(b)) {
        bail!("--hedge-budget must be a share between 0 and 1, not {budget}");
    }
    Ok(())
}

/// `price` with the input and output prices given as flags or profile keys
/// instead of its own; a price that is only given is the whole price.
fn overridden_price(
    price: Option<Price>,
    input: Option<f64>,
    output: Option<f64>,
) -> Result<Option<Price>> {
    for (flag, given) in [("--price-in", input), ("--price-out", output)] {
        if let Some(value) = given.filter(|v| !(v.is_finite() && *v >= 0.0)) {
            bail!("{flag} must be a price of zero or more per million tokens, not {value}");
        }
    }
    if input.is_none() && output.is_none() {
        return Ok(price);
    }
    let base = price.unwrap_or(Price::new(0.0, 0.0));
    Ok(Some(Price {
        input_per_million: input.unwrap_or(base.input_per_million),
        output_per_million: output.unwrap_or(base.output_per_million),
        ..base
    }))
}

pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl Settings {
    pub fn resolve(flags: &Flags) -> Result<Self> {
        let config = ConfigFile::load(flags)?;
        let profile = match flags.profile.as_ref().or(config.default_profile.as_ref()) {
            Some(name) => config
                .profiles
                .get(name)
                .cloned()
                .with_context(|| format!("no profile `{name}` in the config file"))?,
            None => Choices::default(),
        };
        let provider = match flags.choices.provider.or(profile.provider) {
            Some(provider) => provider,
            None if env("OPENAI_API_KEY").is_some() => ProviderKind::Openai,
            None if env("ANTHROPIC_API_KEY").is_some() => ProviderKind::Anthropic,
            // Nothing configured: the embedded model, so fanout works offline.
            None => ProviderKind::Local,
        };
        // The provider's own base URL variable sits between the flags and the profile.
        let base_url_env = Choices {
            base_url: match provider {
                ProviderKind::Openai => env("OPENAI_BASE_URL"),
                ProviderKind::Anthropic => env("ANTHROPIC_BASE_URL"),
                ProviderKind::Mock | ProviderKind::Local => None,
            },
            ..Choices::default()
        };
        let chosen = flags.choices.clone().over(base_url_env).over(profile);
        let hedge = hedging(&chosen, flags.no_hedge)?;
        let model = chosen.model.unwrap_or_else(|| provider.default_model().into());
        let listed = match provider {
            // The embedded model runs on this machine: its calls cost nothing.
            ProviderKind::Local => Some(Price::new(0.0, 0.0)),
            _ => PriceTable::builtin().lookup(&model).map(|m| m.price),
        };
        let price = overridden_price(listed, chosen.price_input, chosen.price_output)?;
        Self {
            provider,
            model,
            base_url: chosen.base_url,
            api_key_env: chosen.api_key_env.unwrap_or_else(|| provider.key_env().into()),
            concurrency: chosen.concurrency.unwrap_or(16).max(1),
            rpm: chosen.rpm,
            tpm: chosen.tpm,
            attempt_timeout: chosen.attempt_timeout.unwrap_or(120.0),
            deadline: chosen.deadline,
            retries: chosen.retries.unwrap_or(4),
            temperature: chosen.temperature,
            max_tokens: chosen.max_tokens,
            threads: chosen.threads.filter(|t| *t > 0),
            kv_memory: chosen.kv_memory.map(|size| size.as_u64()),
            price,
            price_given: chosen.price_input.is_some() || chosen.price_output.is_some(),
            budget: chosen.budget,
            max_total_tokens: chosen.max_total_tokens,
            schema_repairs: chosen.schema_repairs,
            retry_truncated: chosen.retry_truncated,
            hedge,
        }
        .checked_budget()
    }

    /// The spending limit these settings ask for, counting `spent` (what the
    /// job's earlier runs used).
    pub fn spend_limit(&self, spent: Usage) -> Option<SpendLimit> {
        let mut limit = match (self.budget, self.price) {
            (Some(budget), Some(price)) => Some(SpendLimit::cost(budget, price)),
            _ => None,
        };
        if let Some(tokens) = self.max_total_tokens {
            limit = Some(limit.unwrap_or_default().with_max_tokens(tokens));
        }
        limit.map(|l| l.already_spent(spent))
    }

    /// Refuses a budget that cannot be kept: one without a price to count it in.
    fn checked_budget(self) -> Result<Self> {
        if let Some(budget) = self.budget {
            if !(budget.is_finite() && budget >= 0.0) {
                bail!("--budget must be an amount of zero or more dollars, not {budget}");
            }
            if self.price.is_none() {
                bail!(
                    "--budget needs a price, and none is known for model `{}`: give --price-in and --price-out (per million tokens)",
                    self.model
                );
            }
        }
        Ok(self)
    }

    /// Takes the run limits, prices and key variable (not what shapes
    /// answers) given as flags now: a resumed job may run with more
    /// concurrency, another deadline or another key.
    pub fn with_run_limits(mut self, flags: &Flags) -> Result<Self> {
        let now = &flags.choices;
        check_hedge_budget(now.hedge_budget)?;
        self.concurrency = now.concurrency.unwrap_or(self.concurrency).max(1);
        self.rpm = now.rpm.or(self.rpm);
        self.tpm = now.tpm.or(self.tpm);
        self.attempt_timeout = now.attempt_timeout.unwrap_or(self.attempt_timeout);
        self.deadline = now.deadline.or(self.deadline);
        self.retries = now.retries.unwrap_or(self.retries);
        self.threads = now.threads.filter(|t| *t > 0).or(self.threads);
        self.kv_memory = now.kv_memory.map(|size| size.as_u64()).or(self.kv_memory);
        self.api_key_env = now.api_key_env.clone().unwrap_or(self.api_key_env);
        self.price = overridden_price(self.price, now.price_input, now.price_output)?;
        self.price_given |= now.price_input.is_some() || now.price_output.is_some();
        self.budget = now.budget.or(self.budget);
        self.max_total_tokens = now.max_total_tokens.or(self.max_total_tokens);
        self.schema_repairs = now.schema_repairs.or(self.schema_repairs);
        self.retry_truncated = now.retry_truncated.or(self.retry_truncated);
        if flags.no_hedge || now.hedge == Some(false) {
            self.hedge = None;
        } else if now.hedge.is_some() || now.hedge_budget.is_some() || now.hedge_after.is_some() {
            let mut hedge = self.hedge.unwrap_or_default();
            hedge.budget = now.hedge_budget.unwrap_or(hedge.budget);
            hedge.after = now.hedge_after.or(hedge.after);
            self.hedge = Some(hedge);
        }
        self.checked_budget()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_are_seconds_or_have_their_unit() {
        assert_eq!(super::seconds("90"), Ok(90.0));
        assert_eq!(super::seconds("1.5"), Ok(1.5));
        assert_eq!(super::seconds("6h"), Ok(21_600.0));
        assert_eq!(super::seconds("1h 30m"), Ok(5_400.0));
        assert!(super::seconds("soon").unwrap_err().contains("`soon`"));
    }

    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        flags: Flags,
    }

    fn flags(args: &[&str]) -> Flags {
        Command::try_parse_from(std::iter::once("fanout").chain(args.iter().copied()))
            .unwrap()
            .flags
    }

    /// A setting is one field: the same name as a flag and as a profile key,
    /// and a flag wins over the profile.
    #[test]
    fn each_setting_is_a_flag_and_a_profile_key() {
        let profile: Choices = toml::from_str(
            "model = \"m-file\"\nconcurrency = 8\nmax_tokens = 64\nprice_input = 0.15\nhedge = false\n",
        )
        .unwrap();
        let chosen =
            flags(&["--model", "m-flag", "--hedge", "--price-output", "0.6"]).choices.over(profile);
        assert_eq!(chosen.model.as_deref(), Some("m-flag"));
        assert_eq!((chosen.concurrency, chosen.max_tokens), (Some(8), Some(64)));
        assert_eq!((chosen.price_input, chosen.price_output), (Some(0.15), Some(0.6)));
        assert_eq!(chosen.hedge, Some(true), "--hedge turns on what the profile turned off");
        assert_eq!(flags(&["--hedge=false"]).choices.hedge, Some(false));
        assert!(toml::from_str::<Choices>("modle = \"typo\"").is_err(), "unknown keys are refused");
    }
}
