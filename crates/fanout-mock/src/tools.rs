//! The mock's tool use, so an agent loop runs end to end on 127.0.0.1.
//!
//! When a request offers tools and no tool result has come back since the
//! prompt, the mock calls one tool: the one `tool_choice` names, else the
//! one the prompt mentions first, else the first offered. Its
//! arguments come from the tool's schema: a string property `p` takes the
//! value written `p=VALUE` in the prompt (up to the next space, without
//! trailing punctuation), or else the
//! prompt itself; numbers take the prompt's length, booleans `true`, arrays
//! and objects stay empty. Once results are back, the mock answers as usual
//! and quotes them: `... | from tools: <result> | <result>`. With
//! `tool_turns` above 1 it calls a tool again until that many results are back.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::wire::WireMessage;

/// A tool as either API offers it: OpenAI nests it under `function`.
#[derive(Debug, Deserialize)]
pub(crate) struct OfferedTool {
    #[serde(default)]
    name: Option<String>,
    #[serde(default, alias = "input_schema")]
    parameters: Option<Value>,
    #[serde(default)]
    function: Option<Box<OfferedTool>>,
}

impl OfferedTool {
    fn name(&self) -> &str {
        self.function.as_deref().map_or(self.name.as_deref().unwrap_or_default(), OfferedTool::name)
    }

    fn schema(&self) -> Option<&Value> {
        self.function.as_deref().map_or(self.parameters.as_ref(), OfferedTool::schema)
    }
}

/// What the mock does with the tools of a request.
#[derive(Debug, PartialEq)]
pub(crate) enum ToolTurn {
    /// Call this tool with these arguments.
    Call { name: String, arguments: Value },
    /// Answer, quoting these results.
    Answer { results: Vec<String> },
}

/// Decides the turn; `None` when no tools are offered. `turns`: the tool
/// results to wait for before answering.
pub(crate) fn turn(
    tools: &[OfferedTool],
    choice: Option<&Value>,
    messages: &[WireMessage],
    prompt: &str,
    turns: usize,
) -> Option<ToolTurn> {
    let named = choice.and_then(chosen_name);
    if tools.is_empty() || choice.is_some_and(|c| c == "none" || c["type"] == "none") {
        return None;
    }
    // Results given back after the prompt's message mean the call was made.
    let asked = messages.iter().rposition(|m| m.role == "user" && m.tool_results().is_empty());
    let results: Vec<String> = messages
        .iter()
        .skip(asked.map_or(0, |i| i + 1))
        .flat_map(WireMessage::tool_results)
        .collect();
    if !results.is_empty() && results.len() >= turns {
        return Some(ToolTurn::Answer { results });
    }
    let tool = named
        .and_then(|name| tools.iter().find(|t| t.name() == name))
        .or_else(|| {
            let mentioned = tools.iter().filter(|t| !t.name().is_empty());
            mentioned
                .filter_map(|t| Some((prompt.find(t.name())?, t)))
                .min_by_key(|(at, _)| *at)
                .map(|(_, t)| t)
        })
        .unwrap_or(&tools[0]);
    Some(ToolTurn::Call {
        name: tool.name().to_owned(),
        arguments: arguments(tool.schema(), prompt),
    })
}

/// The tool `tool_choice` names, in either API's words.
fn chosen_name(choice: &Value) -> Option<&str> {
    choice["function"]["name"].as_str().or_else(|| choice["name"].as_str())
}

fn arguments(schema: Option<&Value>, prompt: &str) -> Value {
    let mut arguments = Map::new();
    let properties = schema.and_then(|s| s["properties"].as_object());
    for (name, property) in properties.into_iter().flatten() {
        let value = match property["type"].as_str() {
            Some("number" | "integer") => json!(prompt.chars().count()),
            Some("boolean") => json!(true),
            Some("array") => json!([]),
            Some("object") => json!({}),
            _ => json!(written_value(prompt, name).unwrap_or(prompt)),
        };
        arguments.insert(name.clone(), value);
    }
    Value::Object(arguments)
}

/// `VALUE` where the prompt says `name=VALUE`.
fn written_value<'a>(prompt: &'a str, name: &str) -> Option<&'a str> {
    let marker = format!("{name}=");
    let start = prompt.find(&marker)? + marker.len();
    let rest = &prompt[start..];
    let word = rest.split_whitespace().next().unwrap_or_default();
    Some(word.trim_end_matches([',', ';', '.', ':', ')', '!', '?']))
}

/// The answer's text once results are back.
pub(crate) fn quoting(answer: &str, results: &[String]) -> String {
    let quoted: Vec<String> = results.iter().map(|r| r.chars().take(300).collect()).collect();
    format!("{answer} | from tools: {}", quoted.join(" | "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(json: Value) -> Vec<OfferedTool> {
        serde_json::from_value(json).unwrap()
    }

    fn messages(json: Value) -> Vec<WireMessage> {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn calls_a_tool_then_quotes_its_result() {
        let offered = tools(json!([
            {"type": "function", "function": {"name": "list_dir", "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "read_file", "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "limit": {"type": "integer"}}}}},
        ]));
        let prompt = "Use read_file on path=docs/a.md, please (list_dir shows the rest)";
        let asked = messages(json!([{"role": "user", "content": prompt}]));
        assert_eq!(
            turn(&offered, None, &asked, prompt, 1),
            Some(ToolTurn::Call {
                name: "read_file".into(),
                arguments: json!({"path": "docs/a.md", "limit": prompt.chars().count()})
            })
        );
        let named = json!({"type": "function", "function": {"name": "list_dir"}});
        assert!(
            matches!(turn(&offered, Some(&named), &asked, prompt, 1), Some(ToolTurn::Call { name, .. }) if name == "list_dir")
        );
        assert_eq!(turn(&offered, Some(&json!("none")), &asked, prompt, 1), None);
        let answered = messages(json!([
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": null},
            {"role": "tool", "tool_call_id": "c", "content": "# A"},
        ]));
        assert_eq!(
            turn(&offered, None, &answered, prompt, 1),
            Some(ToolTurn::Answer { results: vec!["# A".into()] })
        );
        assert!(
            matches!(turn(&offered, None, &answered, prompt, 2), Some(ToolTurn::Call { .. })),
            "with two tool turns, one result is not enough"
        );
        // A new question after the results is asked afresh.
        let again = messages(json!([
            {"role": "user", "content": prompt},
            {"role": "tool", "tool_call_id": "c", "content": "# A"},
            {"role": "user", "content": "and path=b.md?"},
        ]));
        assert!(matches!(
            turn(&offered, None, &again, "and path=b.md?", 1),
            Some(ToolTurn::Call { .. })
        ));
    }

    #[test]
    fn reads_anthropic_tools_and_results() {
        let offered = tools(
            json!([{"name": "lookup", "input_schema": {"type": "object", "properties": {"word": {"type": "string"}}}}]),
        );
        let answered = messages(json!([
            {"role": "user", "content": "define word=fan-out"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "lookup", "input": {"word": "fan-out"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "one to many"}]},
        ]));
        assert_eq!(
            turn(&offered, None, &answered[..1], "define word=fan-out", 1),
            Some(ToolTurn::Call { name: "lookup".into(), arguments: json!({"word": "fan-out"}) })
        );
        assert_eq!(
            turn(&offered, None, &answered, "define word=fan-out", 1),
            Some(ToolTurn::Answer { results: vec!["one to many".into()] })
        );
    }
}
