//! Workflow files: templated steps in TOML, run in parallel where they can be.
//!
//! ```toml
//! [vars]
//! topic = "the printing press"        # a default; callers may override it
//!
//! [[step]]
//! name = "history"
//! prompt = "Summarize the history of {{ topic }}."
//!
//! [[step]]
//! name = "report"
//! prompt = "Write a report on {{ topic }} from these notes: {{ steps.history }}"
//! ```
//!
//! A step depends on the steps its templates name (`{{ steps.history }}`) and
//! on those in its optional `needs = [...]`. Steps whose dependencies are done
//! run together. Everything is checked before any call: template syntax,
//! unknown variables, steps that do not exist, duplicate names, and cycles.
//!
//! A step with `tools = ["docs", ...]` works as an agent with those tool sets:
//! an MCP server the file declares (`[mcp.docs] command = "npx", args = [...]`,
//! or `url = "..."`), or whatever the caller provides under that name (the
//! CLI's `files`: `read_file` and `list_dir` in the folders of `--allow-dir`
//! and of the file's own `allow_dirs = [...]`, relative to it).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use minijinja::{Environment, UndefinedBehavior};
use serde::{Deserialize, Serialize};

use super::asked::{Ask, ask_all};
use crate::agent::mcp::McpConfig;
use crate::agent::{Agent, Tool, Toolbox, Transcript};
use crate::{Executor, Failure, Request};

/// Named sets of tools a workflow's steps may use, as the caller connected
/// them, and the toolbox every step's tools go into (its time and size bounds).
#[derive(Clone, Default)]
pub struct ToolSets {
    /// The sets, by the names steps use.
    pub sets: BTreeMap<String, Vec<Arc<dyn Tool>>>,
    /// Each step's toolbox starts as a copy of this one.
    pub toolbox: Toolbox,
    /// Turns a step's agent may take unless the step says otherwise.
    pub max_turns: Option<u32>,
}

impl std::fmt::Debug for ToolSets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sets: BTreeMap<&str, usize> =
            self.sets.iter().map(|(k, v)| (k.as_str(), v.len())).collect();
        f.debug_struct("ToolSets")
            .field("sets", &sets)
            .field("toolbox", &self.toolbox)
            .field("max_turns", &self.max_turns)
            .finish()
    }
}

/// A workflow file: variables, MCP servers, and the steps that use them.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workflow {
    /// Template variables' defaults (`[vars]`); callers may override them.
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    /// MCP servers whose tools steps may use (`[mcp.NAME]`), by name.
    #[serde(default)]
    pub mcp: BTreeMap<String, McpConfig>,
    /// Folders the `files` tools may read, relative to the workflow file.
    #[serde(default)]
    pub allow_dirs: Vec<std::path::PathBuf>,
    /// The `[[step]]` tables, in the file's order.
    #[serde(rename = "step", default)]
    pub steps: Vec<Step>,
}

/// One call of a workflow, its prompt a template.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Names the step for `{{ steps.<name> }}` and `needs`; unique in the file.
    pub name: String,
    /// The user message, a template.
    pub prompt: String,
    /// A system message, a template too.
    #[serde(default)]
    pub system: Option<String>,
    /// Steps this one waits for, besides those its templates name.
    #[serde(default)]
    pub needs: Vec<String>,
    /// Caps the step's answer, in tokens.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// The step's sampling temperature; `None` keeps the provider's.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Tool sets the step may use, by name: it then works as an agent.
    #[serde(default)]
    pub tools: Vec<String>,
    /// The most model turns the step's agent may take.
    #[serde(default)]
    pub max_turns: Option<u32>,
}

/// A step's result; exactly one of `text` and `error` is set.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepResult {
    /// The step's name.
    pub name: String,
    /// The step's answer, when it got one.
    pub text: Option<String>,
    /// Why the step has no answer: it failed, its template could not be rendered, or a step it needs failed.
    pub error: Option<Failure>,
    /// The agent's turns, tool calls and results, when the step had tools.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transcript: Option<Transcript>,
}

impl StepResult {
    fn failed(name: &str, error: String) -> Self {
        Self {
            name: name.to_owned(),
            text: None,
            error: Some(Failure::Pattern(error)),
            transcript: None,
        }
    }
}

/// Every step's result, and which steps are the outputs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorkflowResult {
    /// In the file's order.
    pub steps: Vec<StepResult>,
    /// The steps nothing depends on: the workflow's outputs.
    pub outputs: Vec<String>,
}

/// A checked workflow: templates compiled, dependencies known, steps in waves.
#[derive(Debug)]
pub struct Plan {
    workflow: Workflow,
    env: Environment<'static>,
    vars: BTreeMap<String, String>,
    needs: Vec<BTreeSet<usize>>,
    waves: Vec<Vec<usize>>,
}

impl Workflow {
    /// Reads a workflow from TOML; it must have at least one `[[step]]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let workflow: Self =
            toml::from_str(text).map_err(|e| format!("the workflow is not valid TOML: {e}"))?;
        if workflow.steps.is_empty() {
            return Err("the workflow has no [[step]]".into());
        }
        Ok(workflow)
    }

    /// Checks everything that can be checked before a call; `vars` override the file's.
    pub fn plan(self, vars: &BTreeMap<String, String>) -> Result<Plan, Vec<String>> {
        let mut errors = Vec::new();
        let mut values = self.vars.clone();
        values.extend(vars.clone());
        let index: BTreeMap<&str, usize> =
            self.steps.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
        if index.len() != self.steps.len() {
            let mut seen = BTreeSet::new();
            for step in &self.steps {
                if !seen.insert(&step.name) {
                    errors.push(format!("two steps are named `{}`", step.name));
                }
            }
        }
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        let mut needs = vec![BTreeSet::new(); self.steps.len()];
        for (i, step) in self.steps.iter().enumerate() {
            for (part, source) in [("prompt", Some(&step.prompt)), ("system", step.system.as_ref())]
            {
                let Some(source) = source else { continue };
                let name = format!("{}.{part}", step.name);
                if let Err(e) = env.add_template_owned(name.clone(), source.clone()) {
                    errors.push(format!(
                        "step `{}`: the {part} template is not valid: {e}",
                        step.name
                    ));
                    continue;
                }
                let template = env.get_template(&name).expect("just added");
                for variable in template.undeclared_variables(true) {
                    let root = variable.split('.').next().unwrap_or(&variable);
                    if root == "steps" {
                        let step_name =
                            variable.strip_prefix("steps.").and_then(|rest| rest.split('.').next());
                        match step_name.and_then(|n| index.get(n)) {
                            Some(j) => {
                                needs[i].insert(*j);
                            }
                            None => errors.push(format!(
                                "step `{}` uses `{variable}`, but there is no step `{}`",
                                step.name,
                                step_name.unwrap_or("")
                            )),
                        }
                    } else if !values.contains_key(root) {
                        errors.push(format!(
                            "step `{}` uses the variable `{root}`, which is not set (add it to [vars] or pass --var {root}=...)",
                            step.name
                        ));
                    }
                }
            }
            for need in &step.needs {
                match index.get(need.as_str()) {
                    Some(j) => {
                        needs[i].insert(*j);
                    }
                    None => errors.push(format!(
                        "step `{}` needs `{need}`, but there is no such step",
                        step.name
                    )),
                }
            }
        }
        let waves = match waves(&needs) {
            Ok(waves) => waves,
            Err(cycle) => {
                let names: Vec<&str> = cycle.iter().map(|i| self.steps[*i].name.as_str()).collect();
                errors.push(format!(
                    "the steps depend on each other in a cycle: {}",
                    names.join(" -> ")
                ));
                Vec::new()
            }
        };
        errors.sort();
        errors.dedup();
        if errors.is_empty() {
            Ok(Plan { workflow: self, env, vars: values, needs, waves })
        } else {
            Err(errors)
        }
    }
}

/// Steps in waves: each wave's steps depend only on earlier waves. A cycle is
/// returned as the steps on it.
fn waves(needs: &[BTreeSet<usize>]) -> Result<Vec<Vec<usize>>, Vec<usize>> {
    let mut done = BTreeSet::new();
    let mut waves = Vec::new();
    while done.len() < needs.len() {
        let wave: Vec<usize> =
            (0..needs.len()).filter(|i| !done.contains(i) && needs[*i].is_subset(&done)).collect();
        if wave.is_empty() {
            // Walk from any blocked step along unfinished needs until a step repeats.
            let mut path =
                vec![(0..needs.len()).find(|i| !done.contains(i)).expect("some step is left")];
            loop {
                let last = *path.last().expect("non-empty");
                let next = *needs[last]
                    .iter()
                    .find(|j| !done.contains(*j))
                    .expect("a blocked step has a need");
                if let Some(start) = path.iter().position(|s| *s == next) {
                    let mut cycle = path[start..].to_vec();
                    cycle.push(next);
                    return Err(cycle);
                }
                path.push(next);
            }
        }
        done.extend(wave.iter().copied());
        waves.push(wave);
    }
    Ok(waves)
}

impl Plan {
    /// Each step's name and the names of the steps it needs, in the file's order.
    pub fn needs(&self) -> Vec<(&str, Vec<&str>)> {
        let name = |i: usize| self.workflow.steps[i].name.as_str();
        (0..self.needs.len())
            .map(|i| (name(i), self.needs[i].iter().map(|&j| name(j)).collect()))
            .collect()
    }

    /// The MCP servers the file declares, by name.
    pub fn mcp(&self) -> &BTreeMap<String, McpConfig> {
        &self.workflow.mcp
    }

    /// The folders the file lets the `files` tools read, as it wrote them.
    pub fn allow_dirs(&self) -> &[std::path::PathBuf] {
        &self.workflow.allow_dirs
    }

    /// Each step that uses tools, with the tool sets it names.
    pub fn step_tools(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.workflow
            .steps
            .iter()
            .filter(|s| !s.tools.is_empty())
            .map(|s| (s.name.as_str(), s.tools.as_slice()))
    }

    /// Runs the steps, wave by wave, with `tools` for the steps that name
    /// them; a step whose dependency failed is skipped, saying why.
    pub async fn run(&self, executor: &Executor, tools: &ToolSets) -> WorkflowResult {
        let steps = &self.workflow.steps;
        let mut results: Vec<Option<StepResult>> = vec![None; steps.len()];
        for wave in &self.waves {
            let mut asks = Vec::new();
            for &i in wave {
                let failed: Vec<&str> = self.needs[i]
                    .iter()
                    .filter(|j| results[**j].as_ref().is_none_or(|r| r.text.is_none()))
                    .map(|j| steps[*j].name.as_str())
                    .collect();
                if !failed.is_empty() {
                    let error = format!("skipped: it needs {}, which failed", failed.join(", "));
                    results[i] = Some(StepResult::failed(&steps[i].name, error));
                    continue;
                }
                match self.request(i, &results).and_then(|r| Ok((r, agent(&steps[i], tools)?))) {
                    // A step's calls are recorded under its name.
                    Ok((request, agent)) => {
                        asks.push(Ask { id: steps[i].name.clone(), request, agent })
                    }
                    Err(error) => results[i] = Some(StepResult::failed(&steps[i].name, error)),
                }
            }
            for answer in ask_all(executor, asks).await {
                let i = steps.iter().position(|s| s.name == answer.id).expect("ids are step names");
                results[i] = Some(StepResult {
                    name: steps[i].name.clone(),
                    text: answer.text,
                    error: answer.error,
                    transcript: answer.transcript,
                });
            }
        }
        let depended_on: BTreeSet<usize> = self.needs.iter().flatten().copied().collect();
        WorkflowResult {
            outputs: (0..steps.len())
                .filter(|i| !depended_on.contains(i))
                .map(|i| steps[i].name.clone())
                .collect(),
            steps: results.into_iter().map(|r| r.expect("every step is run or skipped")).collect(),
        }
    }

    fn request(&self, i: usize, results: &[Option<StepResult>]) -> Result<Request, String> {
        let step = &self.workflow.steps[i];
        let done: BTreeMap<&str, &str> = results
            .iter()
            .flatten()
            .filter_map(|r| Some((r.name.as_str(), r.text.as_deref()?)))
            .collect();
        let context =
            minijinja::context! { steps => done, ..minijinja::Value::from_serialize(&self.vars) };
        let render = |part: &str| {
            self.env
                .get_template(&format!("{}.{part}", step.name))
                .and_then(|t| t.render(&context))
                .map_err(|e| format!("cannot render the {part} of step `{}`: {e}", step.name))
        };
        let mut request = Request::user(render("prompt")?);
        if step.system.is_some() {
            request = request.with_system(render("system")?);
        }
        request.max_tokens = step.max_tokens;
        request.temperature = step.temperature;
        Ok(request)
    }
}

/// The agent of a step that uses tools, from the sets it names.
fn agent(step: &Step, sets: &ToolSets) -> Result<Option<Agent>, String> {
    if step.tools.is_empty() {
        return Ok(None);
    }
    let mut tools = sets.toolbox.clone();
    for name in &step.tools {
        let set = sets.sets.get(name).ok_or_else(|| {
            format!("step `{}` uses the tools `{name}`, which nothing provides", step.name)
        })?;
        tools.add_set(name, set).map_err(|e| format!("step `{}`: {e}", step.name))?;
    }
    let agent = Agent::new(tools);
    Ok(Some(match step.max_turns.or(sets.max_turns) {
        Some(turns) => agent.max_turns(turns),
        None => agent,
    }))
}
