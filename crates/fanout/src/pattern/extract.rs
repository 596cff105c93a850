//! Pulling the answer out of a sample, so that votes compare answers, not prose.

use std::fmt;
use std::sync::LazyLock;

use regex::Regex;

/// How a sample's answer is extracted.
#[derive(Clone)]
pub enum Extractor {
    /// The first capture group of the first match (the whole match without a group).
    Regex(Regex),
    /// The last number in the text, normalized (`1,000.50` → `1000.5`).
    LastNumber,
    /// A multiple-choice letter A–J (`The answer is (C)`, `**B**`, `Answer: D`).
    Choice,
    /// A field of the first JSON object in the text.
    JsonField(String),
    /// The whole text, normalized: lower case, no punctuation, single spaces.
    Normalized,
}

impl fmt::Debug for Extractor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Regex(regex) => write!(f, "Regex({})", regex.as_str()),
            Self::LastNumber => f.write_str("LastNumber"),
            Self::Choice => f.write_str("Choice"),
            Self::JsonField(field) => write!(f, "JsonField({field})"),
            Self::Normalized => f.write_str("Normalized"),
        }
    }
}

static NUMBER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"-?\d[\d,]*(?:\.\d+)?").expect("valid"));
static STATED_CHOICE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)answer\s*(?:is|:)?\s*[:\-]?\s*\(?\**\s*([A-J])\b").expect("valid")
});
static LONE_CHOICE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?:^|[\s(*\[])([A-J])(?:[)\].:*]|\s|$)").expect("valid"));

/// Lower case, punctuation dropped, whitespace collapsed.
pub fn normalize(text: &str) -> String {
    let kept: String = text
        .chars()
        .map(|c| if c.is_alphanumeric() || c.is_whitespace() { c } else { ' ' })
        .collect();
    kept.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

impl Extractor {
    /// `number`, `choice`, `text`, `json:FIELD` or `regex:PATTERN`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        Ok(match spec {
            "number" => Self::LastNumber,
            "choice" => Self::Choice,
            "text" => Self::Normalized,
            _ => match spec.split_once(':') {
                Some(("json", field)) if !field.is_empty() => Self::JsonField(field.to_owned()),
                Some(("regex", pattern)) => Self::Regex(
                    Regex::new(pattern).map_err(|e| format!("bad --extract regex: {e}"))?,
                ),
                _ => {
                    return Err(format!(
                        "unknown extractor `{spec}`: use number, choice, text, json:FIELD or regex:PATTERN"
                    ));
                }
            },
        })
    }

    /// The answer in `text`, if there is one.
    pub fn extract(&self, text: &str) -> Option<String> {
        match self {
            Self::Regex(regex) => {
                let found = regex.captures(text)?;
                let group = found.get(1).or_else(|| found.get(0))?;
                Some(group.as_str().trim().to_owned())
            }
            Self::LastNumber => {
                let last = NUMBER.find_iter(text).last()?.as_str().replace(',', "");
                let value: f64 = last.parse().ok()?;
                Some(if value.fract() == 0.0 && value.abs() < 1e15 {
                    format!("{}", value as i64)
                } else {
                    format!("{value}")
                })
            }
            Self::Choice => STATED_CHOICE
                .captures_iter(text)
                .last()
                .or_else(|| LONE_CHOICE.captures_iter(text).last())
                .map(|c| c[1].to_uppercase()),
            Self::JsonField(field) => {
                let start = text.find('{')?;
                let mut stream = serde_json::Deserializer::from_str(&text[start..])
                    .into_iter::<serde_json::Value>();
                let value = stream.next()?.ok()?;
                Some(match value.get(field)? {
                    serde_json::Value::String(s) => s.clone(),
                    // Keys sorted: `{"a":1,"b":2}` and `{"b":2,"a":1}` are one answer.
                    other => {
                        let mut other = other.clone();
                        other.sort_all_objects();
                        other.to_string()
                    }
                })
            }
            Self::Normalized => Some(normalize(text)).filter(|s| !s.is_empty()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extractors() {
        let number = Extractor::parse("number").unwrap();
        assert_eq!(number.extract("3 apples and 1,000.50 pears"), Some("1000.5".into()));
        assert_eq!(number.extract("The answer is 42."), Some("42".into()));
        assert_eq!(number.extract("-7.0 degrees"), Some("-7".into()));
        assert_eq!(number.extract("none"), None);
        let choice = Extractor::parse("choice").unwrap();
        assert_eq!(
            choice.extract("I think (A) is tempting, but the answer is (C)."),
            Some("C".into())
        );
        assert_eq!(choice.extract("**B**"), Some("B".into()));
        assert_eq!(choice.extract("Answer: d"), Some("D".into()));
        let json = Extractor::parse("json:verdict").unwrap();
        assert_eq!(
            json.extract("Sure! {\"verdict\": \"pass\", \"n\": 2} done"),
            Some("pass".into())
        );
        assert_eq!(Extractor::parse("json:n").unwrap().extract("{\"n\": 2}"), Some("2".into()));
        // An object's keys in another order are the same answer (one vote).
        let place = Extractor::parse("json:place").unwrap();
        let answer = |text: &str| place.extract(text).unwrap();
        assert_eq!(
            answer(r#"{"place": {"city": "Paris", "land": "FR"}}"#),
            r#"{"city":"Paris","land":"FR"}"#
        );
        assert_eq!(
            answer(r#"{"place": {"land": "FR", "city": "Paris"}}"#),
            r#"{"city":"Paris","land":"FR"}"#
        );
        let regex = Extractor::parse(r"regex:Final: (\w+)").unwrap();
        assert_eq!(regex.extract("work... Final: Paris"), Some("Paris".into()));
        assert_eq!(
            Extractor::parse("text").unwrap().extract("  Paris, France! "),
            Some("paris france".into())
        );
        assert!(Extractor::parse("regex:(").is_err());
        assert!(Extractor::parse("vibes").unwrap_err().contains("unknown extractor"));
    }
}
