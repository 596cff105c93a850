//! Tools from Model Context Protocol servers, through the official Rust SDK
//! (`rmcp`): a server started as a command (stdio) or reached by URL
//! (streamable HTTP) is connected and its tools listed once; every branch
//! then shares the one connection (MCP multiplexes calls by request id).
//!
//! Faults become tool errors the model reads, never a failed run: a server
//! that crashes mid-run fails the calls made after it, and a call that does
//! not answer is cut by the toolbox's timeout like any other tool. A server
//! that cannot start is an [`McpError`] quoting its last stderr lines.
//!
//! A stdio server inherits only `HOME`, `LOGNAME`, `PATH`, `SHELL`, `TERM`,
//! `USER` and `TMPDIR` from fanout's environment (as the official SDKs do),
//! plus its configured `env`: never the provider keys fanout was given.

use std::collections::VecDeque;
use std::fmt;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmcp::ServiceExt;
use rmcp::model::{CallToolRequestParams, ContentBlock};
use rmcp::service::{RoleClient, RunningService};
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use serde_json::{Map, Value};
use tokio::io::AsyncBufReadExt;

use super::tool::Tool;
use crate::provider::ToolSpec;

/// How long a server may take to start and list its tools, by default.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Lines of a stdio server's stderr kept, to explain its failures.
const STDERR_LINES: usize = 20;

/// Why an MCP server could not be used.
#[derive(Debug)]
pub struct McpError {
    /// The server's name, as configured.
    pub server: String,
    /// What went wrong, with the server's last stderr lines when it wrote any.
    pub message: String,
}

impl fmt::Display for McpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MCP server `{}`: {}", self.server, self.message)
    }
}

impl std::error::Error for McpError {}

/// How to reach an MCP server, as a workflow or config file's `[mcp.NAME]`
/// table says it: a `command` (with `args` and `env`) started and spoken to
/// over stdio, or the `url` of a streamable HTTP server.
// Not `Serialize`: `env` often holds keys, and nothing needs to write it out.
#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpConfig {
    /// The program to start, found on `PATH` (`npx`, `uvx`, a path...).
    #[serde(default)]
    pub command: Option<String>,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Variables added to its environment (their values never appear in errors).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// A streamable HTTP server's endpoint, instead of a command.
    #[serde(default)]
    pub url: Option<String>,
}

/// The environment's values and the URL's credentials and query are left
/// out: they are often keys.
impl fmt::Debug for McpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let env: Vec<&str> = self.env.keys().map(String::as_str).collect();
        f.debug_struct("McpConfig")
            .field("command", &self.command)
            .field("args", &self.args)
            .field("env", &env)
            .field("url", &self.url.as_deref().map(redacted))
            .finish()
    }
}

/// A URL without its user information and query, which may carry tokens.
fn redacted(url: &str) -> String {
    let Ok(mut parsed) = reqwest::Url::parse(url) else { return "<not a URL>".into() };
    let _ = parsed.set_username("");
    let _ = parsed.set_password(None);
    parsed.set_query(None);
    parsed.to_string()
}

/// What a stdio server inherits from fanout's environment, as the official
/// MCP SDKs pass it: enough to find programs and a home, and none of the
/// keys fanout itself was given. `env` adds what a server needs.
const INHERITED_ENV: [&str; 7] = ["HOME", "LOGNAME", "PATH", "SHELL", "TERM", "USER", "TMPDIR"];

/// Tool names both APIs accept (`^[a-zA-Z0-9_-]{1,64}$`).
fn valid_tool_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A connected MCP server and the tools it offers.
pub struct McpServer {
    name: String,
    client: Arc<RunningService<RoleClient, ()>>,
    tools: Vec<ToolSpec>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl fmt::Debug for McpServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tools: Vec<&str> = self.tools.iter().map(|t| t.name.as_str()).collect();
        f.debug_struct("McpServer").field("name", &self.name).field("tools", &tools).finish()
    }
}

impl McpServer {
    /// Connects as `config` says: exactly one of `command` and `url`.
    pub async fn start(
        name: impl Into<String>,
        config: &McpConfig,
        start_timeout: Duration,
    ) -> Result<Self, McpError> {
        let name = name.into();
        match (&config.command, &config.url) {
            (Some(command), None) => {
                let env: Vec<(String, String)> =
                    config.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                Self::stdio(name, command, &config.args, &env, start_timeout).await
            }
            (None, Some(url)) => Self::http(name, url, start_timeout).await,
            _ => Err(McpError {
                server: name,
                message: "give either `command` (a stdio server) or `url` (streamable HTTP)".into(),
            }),
        }
    }

    /// Starts `command` with `args` (and `env` added to this process's
    /// environment) and speaks MCP with it over its stdin and stdout.
    pub async fn stdio(
        name: impl Into<String>,
        command: &str,
        args: &[String],
        env: &[(String, String)],
        start_timeout: Duration,
    ) -> Result<Self, McpError> {
        let name = name.into();
        let mut process = tokio::process::Command::new(command);
        process.args(args).env_clear();
        for name in INHERITED_ENV {
            if let Some(value) = std::env::var_os(name) {
                process.env(name, value);
            }
        }
        process.envs(env.iter().map(|(k, v)| (k, v)));
        let spawned = TokioChildProcess::builder(process).stderr(Stdio::piped()).spawn();
        let (transport, stderr) = spawned.map_err(|error| McpError {
            server: name.clone(),
            message: format!("could not start `{command}`: {error}"),
        })?;
        let kept = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(stderr) = stderr {
            tokio::spawn(keep_last_lines(stderr, Arc::clone(&kept)));
        }
        Self::connect(name, transport, kept, start_timeout).await
    }

    /// Connects to a streamable HTTP server at `url`.
    pub async fn http(
        name: impl Into<String>,
        url: &str,
        start_timeout: Duration,
    ) -> Result<Self, McpError> {
        crate::provider::install_crypto_provider();
        let transport = StreamableHttpClientTransport::from_uri(url.to_owned());
        Self::connect(name.into(), transport, Arc::default(), start_timeout).await.map_err(
            |mut e| {
                // The transport's errors may quote the URL, tokens and all.
                e.message = e.message.replace(url, &redacted(url));
                e
            },
        )
    }

    async fn connect<T, E, A>(
        name: String,
        transport: T,
        stderr: Arc<Mutex<VecDeque<String>>>,
        start_timeout: Duration,
    ) -> Result<Self, McpError>
    where
        T: rmcp::transport::IntoTransport<RoleClient, E, A>,
        E: std::error::Error + Send + Sync + 'static,
    {
        let fail = |message: String| McpError {
            server: name.clone(),
            message: with_stderr(message, &stderr),
        };
        let start = async {
            let client =
                ().serve(transport).await.map_err(|e| fail(format!("it did not start: {e}")))?;
            let listed = client
                .list_all_tools()
                .await
                .map_err(|e| fail(format!("it did not list its tools: {e}")))?;
            Ok::<_, McpError>((client, listed))
        };
        let (client, listed) =
            tokio::time::timeout(start_timeout, start).await.map_err(|_| {
                fail(format!("it did not start within {:.0}s", start_timeout.as_secs_f64()))
            })??;
        let (tools, odd): (Vec<_>, Vec<_>) =
            listed.into_iter().partition(|tool| valid_tool_name(&tool.name));
        if !odd.is_empty() {
            let names: Vec<&str> = odd.iter().map(|t| t.name.as_ref()).collect();
            // The APIs refuse a request that offers any of them.
            tracing::warn!(server = %name, tools = ?names, "tools with names the APIs refuse are left out");
        }
        let tools = tools
            .into_iter()
            .map(|tool| {
                ToolSpec::new(
                    tool.name.to_string(),
                    tool.description.map(|d| d.to_string()).unwrap_or_default(),
                    Value::Object((*tool.input_schema).clone()),
                )
            })
            .collect();
        Ok(Self { name, client: Arc::new(client), tools, stderr })
    }

    /// The server's name, as configured.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tools it offers, as listed when it started.
    pub fn specs(&self) -> &[ToolSpec] {
        &self.tools
    }

    /// The last lines a stdio server wrote to stderr, for the user (not the
    /// model) to read when its calls fail.
    pub fn stderr_tail(&self) -> Vec<String> {
        self.stderr.lock().unwrap().iter().cloned().collect()
    }

    /// Its tools, to add to a [`Toolbox`](super::Toolbox); each call goes to this server.
    pub fn tools(&self) -> Vec<Arc<dyn Tool>> {
        self.tools
            .iter()
            .map(|spec| {
                Arc::new(McpTool {
                    server: self.name.clone(),
                    client: Arc::clone(&self.client),
                    spec: spec.clone(),
                }) as Arc<dyn Tool>
            })
            .collect()
    }
}

/// One tool of an MCP server.
struct McpTool {
    server: String,
    client: Arc<RunningService<RoleClient, ()>>,
    spec: ToolSpec,
}

#[async_trait::async_trait]
impl Tool for McpTool {
    fn spec(&self) -> ToolSpec {
        self.spec.clone()
    }

    async fn call(&self, arguments: Map<String, Value>) -> Result<String, String> {
        let params = CallToolRequestParams::new(self.spec.name.clone()).with_arguments(arguments);
        // The server's stderr stays out of what the model (and the
        // transcript) reads: a server may print anything there, keys included.
        let result = self
            .client
            .call_tool(params)
            .await
            .map_err(|error| format!("the MCP server `{}` failed: {error}", self.server))?;
        let text = result
            .content
            .iter()
            .map(|block| match block {
                ContentBlock::Text(text) => text.text.clone(),
                ContentBlock::Image(_) => "[an image]".into(),
                ContentBlock::Audio(_) => "[audio]".into(),
                ContentBlock::Resource(_) => "[an embedded resource]".into(),
                ContentBlock::ResourceLink(link) => format!("[resource {}]", link.uri),
                _ => "[content of a kind fanout does not know]".into(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let text = match (text.is_empty(), &result.structured_content) {
            (true, Some(structured)) => structured.to_string(),
            _ => text,
        };
        if result.is_error == Some(true) { Err(text) } else { Ok(text) }
    }
}

/// Keeps the last lines a server wrote to stderr.
async fn keep_last_lines(stderr: tokio::process::ChildStderr, kept: Arc<Mutex<VecDeque<String>>>) {
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut kept = kept.lock().unwrap();
        if kept.len() == STDERR_LINES {
            kept.pop_front();
        }
        kept.push_back(line);
    }
}

fn with_stderr(message: String, stderr: &Mutex<VecDeque<String>>) -> String {
    let lines = stderr.lock().unwrap();
    if lines.is_empty() {
        return message;
    }
    let said: Vec<&str> = lines.iter().map(String::as_str).collect();
    format!("{message}; its stderr ended with:\n  {}", said.join("\n  "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_environment_values() {
        let config = McpConfig {
            command: Some("server".into()),
            env: [("API_TOKEN".to_owned(), "tok-secret-123".to_owned())].into(),
            ..McpConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(shown.contains("API_TOKEN") && !shown.contains("tok-secret-123"), "{shown}");
    }
}
