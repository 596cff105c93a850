//! The prompt: a Jinja template rendered with each row's fields.
//!
//! Syntax errors are found when the command starts, before any call. A row
//! without a variable the template uses fails on its own, naming the field.

use std::collections::BTreeSet;

use anyhow::{Result, anyhow};
use fanout::Request;
use minijinja::{Environment, UndefinedBehavior};
use serde_json::{Map, Value};

#[derive(Debug)]
pub struct Prompt {
    env: Environment<'static>,
    has_system: bool,
    /// Top-level variables the templates use.
    variables: BTreeSet<String>,
}

impl Prompt {
    pub fn new(template: &str, system: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.add_template_owned("prompt", template.to_owned())
            .map_err(|e| anyhow!("the prompt template is not valid: {e:#}"))?;
        if let Some(system) = system {
            env.add_template_owned("system", system.to_owned())
                .map_err(|e| anyhow!("the system template is not valid: {e:#}"))?;
        }
        let mut variables = BTreeSet::new();
        for name in ["prompt", "system"].iter().take(if system.is_some() { 2 } else { 1 }) {
            let template = env.get_template(name).expect("added above");
            variables.extend(template.undeclared_variables(false));
        }
        Ok(Self { env, has_system: system.is_some(), variables })
    }

    /// The request for a row, or why there is none.
    pub fn render(&self, fields: &Map<String, Value>, line: u64) -> Result<Request, String> {
        if let Some(missing) = self.variables.iter().find(|v| !fields.contains_key(*v)) {
            return Err(format!(
                "line {line}: the template uses `{missing}`, which this row does not have"
            ));
        }
        let context = minijinja::Value::from_serialize(fields);
        let render = |name: &str| {
            let template = self.env.get_template(name).expect("added at start");
            template
                .render(&context)
                .map_err(|e| format!("line {line}: cannot render the {name} template: {e}"))
        };
        let mut request = Request::user(render("prompt")?);
        if self.has_system {
            request = request.with_system(render("system")?);
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn renders_rows_and_names_missing_fields() {
        let prompt =
            Prompt::new("Grade {{ essay }} by {{ author | upper }}", Some("Rubric: {{ rubric }}"))
                .unwrap();
        let request = prompt
            .render(&fields(json!({"essay": "The sea", "author": "ana", "rubric": "1-10"})), 1)
            .unwrap();
        assert_eq!(request.prompt(), "Grade The sea by ANA");
        assert_eq!(request.messages[0].content, "Rubric: 1-10");
        let error = prompt.render(&fields(json!({"essay": "x", "author": "y"})), 7).unwrap_err();
        assert_eq!(error, "line 7: the template uses `rubric`, which this row does not have");
    }

    #[test]
    fn syntax_errors_are_found_up_front() {
        let error = Prompt::new("Grade {{ essay ", None).unwrap_err().to_string();
        assert!(error.contains("the prompt template is not valid"), "{error}");
        assert!(error.contains("syntax error"), "{error}");
    }
}
