//! What tokens cost: a [`Price`], and the built-in price table of the common
//! OpenAI and Anthropic models (`data/prices.toml`, with the date it was checked).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::provider::Usage;

/// Prices in currency units (e.g. USD) per million tokens.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Price {
    /// Price of a million input (prompt) tokens.
    pub input_per_million: f64,
    /// Price of a million output tokens.
    pub output_per_million: f64,
    /// Price of a million input tokens read from the provider's prompt cache;
    /// `None` prices them as plain input.
    #[serde(default)]
    pub cached_input_per_million: Option<f64>,
}

impl Price {
    /// A price per million input and output tokens (cached input at the input price).
    pub const fn new(input_per_million: f64, output_per_million: f64) -> Self {
        Self { input_per_million, output_per_million, cached_input_per_million: None }
    }

    /// Prices cached input tokens apart.
    #[must_use]
    pub const fn with_cached_input(mut self, per_million: f64) -> Self {
        self.cached_input_per_million = Some(per_million);
        self
    }

    /// Every price times `factor` (a batch discount of 50% is `0.5`).
    #[must_use]
    pub fn scaled(self, factor: f64) -> Self {
        Self {
            input_per_million: self.input_per_million * factor,
            output_per_million: self.output_per_million * factor,
            cached_input_per_million: self.cached_input_per_million.map(|p| p * factor),
        }
    }

    /// What `usage` costs, in the price's currency units.
    pub fn cost(&self, usage: Usage) -> f64 {
        let cached = usage.cached_input_tokens.min(usage.input_tokens);
        let cached_price = self.cached_input_per_million.unwrap_or(self.input_per_million);
        ((usage.input_tokens - cached) as f64 * self.input_per_million
            + cached as f64 * cached_price
            + usage.output_tokens as f64 * self.output_per_million)
            / 1e6
    }
}

/// A model's entry in a [`PriceTable`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelPrice {
    /// What the model costs online.
    pub price: Price,
    /// What it costs through the vendor's Batch API.
    pub batch: Price,
}

/// Prices of models by name, by vendor.
#[derive(Clone, Debug, PartialEq)]
pub struct PriceTable {
    /// When the prices were last checked against the vendors' lists.
    pub checked: String,
    models: BTreeMap<String, ModelPrice>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TableFile {
    checked: String,
    vendors: BTreeMap<String, VendorFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VendorFile {
    batch_discount: f64,
    models: BTreeMap<String, toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryFile {
    input: f64,
    output: f64,
    cached_input: Option<f64>,
}

fn check_amount(what: &str, value: f64) -> Result<f64, String> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(format!("{what} must be a price of zero or more, not {value}"))
    }
}

impl PriceTable {
    /// Reads a table in `data/prices.toml`'s format; an error names the entry.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: TableFile =
            toml::from_str(text).map_err(|e| format!("the price table is not valid: {e}"))?;
        let mut models = BTreeMap::new();
        for (vendor, listed) in file.vendors {
            let discount = listed.batch_discount;
            if !(0.0..=1.0).contains(&discount) {
                return Err(format!(
                    "price table: vendor `{vendor}`: batch_discount must be a share between 0 and 1, not {discount}"
                ));
            }
            for (model, value) in listed.models {
                let named = |e: String| format!("price table: `{vendor}.models.{model}`: {e}");
                let entry: EntryFile = value.try_into().map_err(|e| named(e.to_string()))?;
                let mut price = Price::new(
                    check_amount("input", entry.input).map_err(named)?,
                    check_amount("output", entry.output).map_err(named)?,
                );
                if let Some(cached) = entry.cached_input {
                    price = price
                        .with_cached_input(check_amount("cached_input", cached).map_err(named)?);
                }
                let batch = price.scaled(1.0 - discount);
                models.insert(model, ModelPrice { price, batch });
            }
        }
        Ok(Self { checked: file.checked, models })
    }

    /// The table kept in the repository.
    pub fn builtin() -> &'static Self {
        static TABLE: OnceLock<PriceTable> = OnceLock::new();
        TABLE.get_or_init(|| {
            Self::parse(include_str!("../data/prices.toml"))
                .expect("the built-in price table is valid (tested)")
        })
    }

    /// The price of `model`: its own entry, or that of the model it is a
    /// dated snapshot or `-latest` alias of.
    pub fn lookup(&self, model: &str) -> Option<ModelPrice> {
        if let Some(found) = self.models.get(model) {
            return Some(*found);
        }
        self.models.get(unversioned(model)?).copied()
    }
}

/// `gpt-4o-mini-2024-07-18` → `gpt-4o-mini`; `claude-sonnet-4-5-20250929` →
/// `claude-sonnet-4-5`; `claude-3-5-haiku-latest` → `claude-3-5-haiku`.
/// Only a date or `latest` is stripped, so `gpt-4o-audio` never takes
/// `gpt-4o`'s price.
fn unversioned(model: &str) -> Option<&str> {
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    if let Some(base) = model.strip_suffix("-latest") {
        return Some(base);
    }
    let (base, day) = model.rsplit_once('-')?;
    if digits(day, 8) {
        return Some(base);
    }
    // YYYY-MM-DD: three dash-separated parts.
    let (rest, month) = base.rsplit_once('-')?;
    let (base, year) = rest.rsplit_once('-')?;
    (digits(year, 4) && digits(month, 2) && digits(day, 2)).then_some(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_table_reads_and_prices_snapshots_and_aliases() {
        let table = PriceTable::builtin();
        assert_eq!(table.checked, "2026-12-01");
        let mini = table.lookup("gpt-4o-mini").unwrap();
        assert_eq!(mini.price, Price::new(0.15, 0.60).with_cached_input(0.075));
        assert_eq!(mini.batch.output_per_million, 0.30);
        assert_eq!(table.lookup("gpt-4o-mini-2024-07-18"), Some(mini));
        assert!(table.lookup("claude-sonnet-4-5-20250929").is_some());
        assert_eq!(table.lookup("claude-3-5-haiku-latest").unwrap().price.input_per_million, 0.80);
        assert_eq!(
            table.lookup("gpt-4o-audio-preview"),
            None,
            "only dates and aliases are stripped"
        );
        assert_eq!(table.lookup("llama-3-70b"), None);
    }

    #[test]
    fn cached_input_is_priced_apart() {
        let price = Price::new(2.0, 10.0).with_cached_input(0.5);
        let usage = Usage { cached_input_tokens: 400_000, ..Usage::new(1_000_000, 100_000) };
        assert!((price.cost(usage) - (0.6 * 2.0 + 0.4 * 0.5 + 0.1 * 10.0)).abs() < 1e-9);
        assert!((Price::new(2.0, 10.0).cost(usage) - 3.0).abs() < 1e-9);
    }

    #[test]
    fn a_malformed_entry_is_named() {
        let text = "checked = \"x\"\n[vendors.acme]\nbatch_discount = 0.5\n[vendors.acme.models]\n\
                    \"m-1\" = { input = 1.0, output = -2.0 }\n";
        let error = PriceTable::parse(text).unwrap_err();
        assert!(error.contains("`acme.models.m-1`") && error.contains("output"), "{error}");
        let missing = text.replace("output = -2.0", "outptu = 2.0");
        let error = PriceTable::parse(&missing).unwrap_err();
        assert!(error.contains("`acme.models.m-1`"), "{error}");
    }
}
