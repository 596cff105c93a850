//! An OpenAI- and Anthropic-compatible mock LLM server for tests and benchmarks.
//!
//! It speaks `POST /v1/chat/completions` (JSON and SSE streaming, `n` choices),
//! `POST /v1/messages` (Anthropic, JSON and SSE), `GET /v1/models` (and
//! `/v1/models/{id}`), and
//! `GET /stats` (requests by status, most in flight, client connections; `POST /stats/reset`
//! zeroes it). Its behaviour comes from a [`Config`]: latency with jitter,
//! generation speed, deterministic or weighted answers, RPM and TPM buckets that
//! answer 429 with `Retry-After` and rate-limit headers, and injected faults
//! (HTTP 500s, hangs, truncated JSON), all drawn from a seeded generator.
//!
//! ```no_run
//! # async fn example() -> std::io::Result<()> {
//! use fanout_mock::{Config, Limit, MockServer};
//! let server = MockServer::start(Config { rpm: Some(Limit::per_minute(600)), ..Config::default() }).await?;
//! println!("OPENAI_BASE_URL={}", server.openai_base_url());
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod answer;
mod anthropic;
mod batches;
mod bucket;
mod config;
mod openai;
mod server;
mod stats;
mod tools;
mod wire;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State as Shared;
use axum::routing::{get, post};

pub use batches::BatchStats;
pub use config::{Answers, Config, Limit};
pub use stats::StatsSnapshot;

use server::State;

/// A running mock server; it stops when dropped.
#[derive(Debug)]
pub struct MockServer {
    addr: SocketAddr,
    state: Arc<State>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl MockServer {
    /// Serves on 127.0.0.1 at a free port.
    pub async fn start(config: Config) -> std::io::Result<Self> {
        Self::bind(config, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Serves on `addr` (port 0 picks a free one).
    pub async fn bind(config: Config, addr: SocketAddr) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::new(config));
        let _ = state.addr.set(addr);
        let app = router(Arc::clone(&state));
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let stop = async move {
                let _ = stopped.await;
            };
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
            if let Err(error) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
                eprintln!("fanout-mock: {error}");
            }
        });
        Ok(Self { addr, state, shutdown: Some(shutdown) })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL for OpenAI clients (`OPENAI_BASE_URL`), ending in `/v1`.
    pub fn openai_base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The base URL for Anthropic clients (`ANTHROPIC_BASE_URL`).
    pub fn anthropic_base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The counters so far, as `GET /stats` serves them.
    pub fn stats(&self) -> StatsSnapshot {
        self.state.snapshot()
    }

    /// Waits until the server is dropped elsewhere or the task is cancelled.
    pub async fn serve_forever(self) {
        std::future::pending::<()>().await;
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/models", get(models))
        .route("/v1/models/{model}", get(model))
        .route("/v1/files", post(batches::upload))
        .route("/v1/files/{id}/content", get(batches::file_content))
        .route("/v1/batches", post(batches::create).get(batches::list_batches))
        .route("/v1/batches/{id}", get(batches::get_batch))
        .route("/v1/batches/{id}/cancel", post(batches::cancel_batch))
        .route(
            "/v1/messages/batches",
            post(batches::create_message_batch).get(batches::list_message_batches),
        )
        .route("/v1/messages/batches/{id}", get(batches::get_message_batch))
        .route("/v1/messages/batches/{id}/cancel", post(batches::cancel_message_batch))
        .route("/v1/messages/batches/{id}/results", get(batches::message_batch_results))
        // A batch's input is as large as the services take (OpenAI's 200 MB,
        // Anthropic's 256 MB); calls stay under axum's 2 MB default.
        .layer(axum::extract::DefaultBodyLimit::max(256 * 1024 * 1024))
        .route("/stats", get(stats))
        .route("/stats/reset", post(reset))
        .with_state(state)
}

async fn models(Shared(state): Shared<Arc<State>>) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({
        "object": "list",
        "data": [{"id": state.config.model, "object": "model", "created": 0, "owned_by": "fanout-mock"}],
    }))
}

/// One model's description (OpenAI's and Anthropic's `GET /v1/models/{id}`),
/// which clients use to check their key: the mock serves any model asked for.
async fn model(
    axum::extract::Path(model): axum::extract::Path<String>,
) -> axum::Json<serde_json::Value> {
    axum::Json(
        serde_json::json!({"id": model, "object": "model", "created": 0, "owned_by": "fanout-mock"}),
    )
}

async fn stats(Shared(state): Shared<Arc<State>>) -> axum::Json<StatsSnapshot> {
    axum::Json(state.snapshot())
}

async fn reset(Shared(state): Shared<Arc<State>>) -> axum::Json<StatsSnapshot> {
    state.stats.reset();
    axum::Json(state.snapshot())
}
