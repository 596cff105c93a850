//! Connecting the resolved settings to the work: the provider they name
//! (reading its key from the environment only now, never storing it, and
//! loading the local model) and an executor with their limits.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use fanout::{
    Anthropic, ExecutorBuilder, HttpApi, HttpBuilder, HttpOptions, MockProvider, OpenAi, Provider,
    Request, SpendLimit, Usage,
};

use crate::models;
use crate::settings::{Hedging, ProviderKind, Settings, env};

/// The provider these settings describe. The key is read from the environment
/// variable the settings name, now: it is never stored. The local model is
/// loaded (and fetched first if it is missing).
pub async fn provider(settings: &Settings, quiet: bool) -> Result<Arc<dyn Provider>> {
    let key = env(&settings.api_key_env);
    match settings.provider {
        ProviderKind::Openai if settings.base_url.is_none() && key.is_none() => bail!(
            "{} is not set: the OpenAI API needs a key (or pass --base-url for a local server)",
            settings.api_key_env
        ),
        ProviderKind::Anthropic if key.is_none() => {
            bail!("{} is not set: the Anthropic API needs a key", settings.api_key_env)
        }
        ProviderKind::Openai | ProviderKind::Anthropic => http_provider(settings, key),
        ProviderKind::Mock => Ok(Arc::new(MockProvider::new())),
        ProviderKind::Local => models::load(settings, quiet).await,
    }
}

/// The HTTP provider (OpenAI-compatible or Anthropic) these settings name,
/// with `key`; `None` for another provider.
pub fn http_provider(settings: &Settings, key: Option<String>) -> Result<Arc<dyn Provider>> {
    Ok(match settings.provider {
        ProviderKind::Openai => Arc::new(http_builder::<OpenAi>(settings, key).build()?),
        ProviderKind::Anthropic => Arc::new(http_builder::<Anthropic>(settings, key).build()?),
        ProviderKind::Mock | ProviderKind::Local => {
            bail!("{:?} is not an HTTP API", settings.provider)
        }
    })
}

/// The Batch API of the provider these settings name (`--via batch-api`),
/// with its key from the environment, read now.
pub fn batch_api(settings: &Settings) -> Result<Arc<dyn fanout::batches::BatchApi>> {
    use fanout::batches::{AnthropicBatches, OpenAiBatches};
    let key = env(&settings.api_key_env);
    if key.is_none() && settings.base_url.is_none() {
        bail!("{} is not set: the Batch API needs a key", settings.api_key_env);
    }
    Ok(match settings.provider {
        ProviderKind::Openai => Arc::new(http_builder::<OpenAiBatches>(settings, key).build()?),
        ProviderKind::Anthropic => {
            Arc::new(http_builder::<AnthropicBatches>(settings, key).build()?)
        }
        ProviderKind::Mock | ProviderKind::Local => bail!(
            "--via batch-api sends to a provider's Batch API: it needs --provider openai or anthropic"
        ),
    })
}

/// An HTTP API's settings from these: its model, base URL, key, and as many
/// idle connections as calls at once.
fn http_builder<Api: HttpApi>(settings: &Settings, key: Option<String>) -> HttpBuilder<Api> {
    let http = HttpOptions { max_idle_connections: settings.concurrency, ..HttpOptions::default() };
    let mut builder = HttpBuilder::<Api>::new(&settings.model).http(http);
    if let Some(url) = &settings.base_url {
        builder = builder.base_url(url);
    }
    if let Some(key) = key {
        builder = builder.api_key(key);
    }
    builder
}

/// Refuses (before any call) a spending limit that one call of `request`
/// alone could exceed, with the call's estimate.
pub fn check_budget_fits(
    settings: &Settings,
    provider: &dyn Provider,
    request: &Request,
) -> Result<()> {
    let Some(limit) = settings.spend_limit(Usage::default()) else { return Ok(()) };
    let most = SpendLimit::most_spent(provider, request, provider.estimate_tokens(request));
    let model = request.model.as_deref().unwrap_or(&settings.model);
    if limit.allows(model, most) {
        return Ok(());
    }
    let cost = limit.cost_of(model, most).map(|c| format!(", ${c:.6}")).unwrap_or_default();
    let limits = [
        settings.budget.map(|b| format!("--budget {b}")),
        settings.max_total_tokens.map(|t| format!("--max-total-tokens {t}")),
    ];
    bail!(
        "{} is less than one call: the first request may use up to {} tokens in and {} out{cost}",
        limits.into_iter().flatten().collect::<Vec<_>>().join(" and "),
        most.input_tokens,
        most.output_tokens,
    )
}

/// An executor builder with these limits, retries and timeouts; `spent` is
/// what the job's earlier runs used of its spending limit.
pub fn executor(settings: &Settings, provider: Arc<dyn Provider>, spent: Usage) -> ExecutorBuilder {
    let mut builder = fanout::Executor::builder_for(provider)
        .concurrency(settings.concurrency)
        .max_attempts(settings.retries.saturating_add(1))
        .attempt_timeout(Some(Duration::from_secs_f64(settings.attempt_timeout.max(0.001))))
        .deadline(settings.deadline.map(|d| Duration::from_secs_f64(d.max(0.0))))
        .span_content(crate::telemetry::content());
    if let Some(rpm) = settings.rpm {
        builder = builder.rpm(rpm);
    }
    if let Some(tpm) = settings.tpm {
        builder = builder.tpm(tpm);
    }
    if let Some(price) = settings.price {
        builder = builder.price(price);
    }
    if let Some(limit) = settings.spend_limit(spent) {
        builder = builder.spend_limit(limit);
    }
    if let Some(repairs) = settings.schema_repairs {
        builder = builder.schema_repairs(repairs);
    }
    if let Some(factor) = settings.retry_truncated {
        builder = builder.retry_truncated(factor);
    }
    builder.hedge(settings.hedge.map(Hedging::policy))
}
