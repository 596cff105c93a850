//! Tools for the commands whose parts may work as agents (`sections`,
//! `perspectives`, `run`): the flags, and connecting the tool sets they name.
//!
//! A tool set is `files` (the built-in `read_file` and `list_dir`, confined to
//! the folders of `--allow-dir`) or an MCP server declared as `[mcp.NAME]` in
//! a workflow file or the config file. Each server is started once per run,
//! only if some part uses it, and shared by every part. Nothing that runs
//! commands or reaches the network is on unless the user declares it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use fanout::agent::files::AllowedDirs;
use fanout::agent::mcp::{DEFAULT_START_TIMEOUT, McpConfig, McpServer};
use fanout::agent::{Agent, DEFAULT_MAX_TURNS, Toolbox};
use fanout::pattern::workflow::ToolSets;

/// The built-in tool set's name.
pub const FILES: &str = "files";

/// Tool flags.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ToolArgs {
    /// Tool sets the parts may use: `files` (needs --allow-dir) or MCP servers
    /// of the config file's [mcp.NAME] tables; comma-separated or repeated
    #[arg(long, value_delimiter = ',')]
    pub tools: Vec<String>,
    /// A folder the `files` tools (read_file, list_dir) may read; repeatable.
    /// Given alone, it turns the `files` tools on
    #[arg(long = "allow-dir")]
    pub allow_dirs: Vec<PathBuf>,
    /// The most model turns an agent may take (the last is asked for an answer)
    #[arg(long, default_value_t = DEFAULT_MAX_TURNS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_turns: u32,
    /// Seconds one tool call may take
    #[arg(long, default_value_t = 30.0, value_parser = positive_seconds)]
    pub tool_timeout: f64,
}

fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds > 0.0 && seconds < 1e9 => Ok(seconds),
        _ => Err(format!("`{text}` is not a number of seconds above 0")),
    }
}

impl ToolArgs {
    /// The sets the flags name: `--tools`, and `files` when only `--allow-dir` is given.
    pub fn named(&self) -> Vec<String> {
        let mut names = self.tools.clone();
        if !self.allow_dirs.is_empty() && !names.iter().any(|n| n == FILES) {
            names.push(FILES.to_owned());
        }
        names
    }

    /// One agent over every set the flags name, or `None` when they name none.
    pub async fn agent(&self, servers: &BTreeMap<String, McpConfig>) -> Result<Option<Agent>> {
        let names = self.named();
        if names.is_empty() {
            return Ok(None);
        }
        let connected = self.connect(&names, servers).await?;
        let mut tools = connected.toolbox;
        for (name, set) in &connected.sets {
            tools.add_set(name, set).map_err(|e| anyhow!(e))?;
        }
        Ok(Some(Agent::new(tools).max_turns(self.max_turns)))
    }

    /// Connects the sets `names` lists (each once), from `servers` and the
    /// flags, with the flags' bounds.
    pub async fn connect(
        &self,
        names: &[String],
        servers: &BTreeMap<String, McpConfig>,
    ) -> Result<ToolSets> {
        let toolbox = Toolbox::new().timeout(Duration::from_secs_f64(self.tool_timeout));
        let mut sets = ToolSets { toolbox, max_turns: Some(self.max_turns), ..ToolSets::default() };
        for name in names {
            if sets.sets.contains_key(name) {
                continue;
            }
            let tools = if name == FILES {
                if self.allow_dirs.is_empty() {
                    bail!("the `files` tools need --allow-dir FOLDER: the folders they may read");
                }
                AllowedDirs::new(self.allow_dirs.iter().cloned()).map_err(|e| anyhow!(e))?.tools()
            } else {
                let Some(config) = servers.get(name) else {
                    let known: Vec<&str> =
                        std::iter::once(FILES).chain(servers.keys().map(String::as_str)).collect();
                    bail!(
                        "no tool set `{name}`: declare it as [mcp.{name}] (the tool sets are: {})",
                        known.join(", ")
                    );
                };
                McpServer::start(name.clone(), config, DEFAULT_START_TIMEOUT).await?.tools()
            };
            sets.sets.insert(name.clone(), tools);
        }
        Ok(sets)
    }
}
