//! OpenTelemetry export of a command's spans (`--otlp-endpoint`, or the
//! standard `OTEL_EXPORTER_OTLP_ENDPOINT`): the command's root span, and under
//! it the executor's `fanout.run` → `fanout.task` → `chat {model}` spans with
//! the GenAI semantic conventions' attributes (see the library's
//! `exec::telemetry`), sent over OTLP/HTTP with protobuf by a batching
//! thread, flushed when the command ends.
//!
//! Only fanout's own spans are exported (targets under `fanout`), not the
//! HTTP stack's tracing. Prompt and answer text go in only with
//! `--otlp-content` (or `OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`,
//! the variable the GenAI instrumentations share); keys never do. The
//! exporter also reads the standard `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT` and `OTEL_SERVICE_NAME`.

use std::sync::OnceLock;

use anyhow::Result;
use tracing::Span;

/// The telemetry flags, global to every command.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct TelemetryArgs {
    /// Export spans of the run, its tasks and every call over OTLP/HTTP to this
    /// collector (its base URL: /v1/traces is added)
    #[arg(long, global = true, value_name = "URL", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Put prompts and answers in the spans (gen_ai.input.messages,
    /// gen_ai.output.messages); they are left out by default
    #[arg(
        long,
        global = true,
        env = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
        value_parser = clap::builder::FalseyValueParser::new()
    )]
    pub otlp_content: bool,
}

/// Whether calls' spans carry their text: set once, when telemetry starts.
static CONTENT: OnceLock<bool> = OnceLock::new();

/// Whether this command's spans carry prompts and answers.
pub fn content() -> bool {
    CONTENT.get().copied().unwrap_or(false)
}

/// The command's telemetry while it runs; dropping it sends what is left.
#[derive(Debug, Default)]
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    /// Spans the collector did not take, and its last error.
    #[cfg(feature = "otlp")]
    lost: otlp::Lost,
    #[cfg(feature = "otlp")]
    url: String,
}

impl Telemetry {
    /// Starts exporting when an endpoint is given. Must be called outside the
    /// async runtime: the exporter's blocking HTTP client has its own.
    pub fn start(args: &TelemetryArgs) -> Result<Self> {
        let _ = CONTENT.set(args.otlp_content);
        let Some(endpoint) = args.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) else {
            return Ok(Self::default());
        };
        Self::export_to(&traces_url(endpoint))
    }

    #[cfg(feature = "otlp")]
    fn export_to(url: &str) -> Result<Self> {
        use anyhow::Context;
        use opentelemetry_otlp::WithExportConfig;
        // reqwest's TLS is rustls without a provider of its own (see the workspace).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(url)
            .build()
            .with_context(|| format!("cannot export spans to {url}"))?;
        let lost = otlp::Lost::default();
        let provider = otlp::provider(otlp::Counted { inner: exporter, lost: lost.clone() });
        tracing::subscriber::set_global_default(otlp::subscriber(&provider))
            .context("a tracing subscriber was already set")?;
        Ok(Self { provider: Some(provider), lost, url: url.to_owned() })
    }

    /// Said, not refused: the endpoint may come from an environment set for
    /// other programs, and the run does not need the spans.
    #[cfg(not(feature = "otlp"))]
    fn export_to(url: &str) -> Result<Self> {
        eprintln!(
            "fanout: no spans are sent to {url}: this fanout was built without its `otlp` \
             feature (cargo build -p fanout-cli --features otlp)"
        );
        Ok(Self::default())
    }

    /// The span every other span of the command is under.
    pub fn root(command: &str) -> Span {
        tracing::info_span!(
            target: "fanout",
            "fanout",
            otel.name = format!("fanout {command}").as_str(),
            fanout.command = command,
        )
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider.take() {
            let shut = provider.shutdown();
            let (spans, last) = self.lost.take();
            if spans > 0 {
                let why = last.unwrap_or_default();
                eprintln!("fanout: {spans} spans could not be sent to {}: {why}", self.url);
            } else if let Err(error) = shut {
                eprintln!("fanout: spans not all sent to {}: {error}", self.url);
            }
        }
    }
}

/// The collector's address for traces: a base URL (as
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is, per the specification) gets `/v1/traces`;
/// one that already names it is kept.
fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") { base.to_owned() } else { format!("{base}/v1/traces") }
}

#[cfg(feature = "otlp")]
pub(crate) mod otlp {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider;
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;

    /// A tracer provider batching spans to `exporter`, as service `fanout`
    /// unless `OTEL_SERVICE_NAME` names another.
    pub fn provider(exporter: impl SpanExporter + 'static) -> SdkTracerProvider {
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("fanout");
        }
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build()
    }

    /// How many spans were not taken, and the last error: the SDK drops
    /// them quietly, and a user who asked for them should hear it once.
    #[derive(Clone, Debug, Default)]
    pub struct Lost(Arc<Mutex<(u64, Option<String>)>>);

    impl Lost {
        pub fn take(&self) -> (u64, Option<String>) {
            std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
        }
    }

    /// An exporter that counts the spans its collector did not take.
    #[derive(Debug)]
    pub struct Counted<E> {
        pub inner: E,
        pub lost: Lost,
    }

    impl<E: SpanExporter> SpanExporter for Counted<E> {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            let spans = batch.len() as u64;
            let result = self.inner.export(batch).await;
            if let Err(error) = &result {
                let mut lost = self.lost.0.lock().unwrap_or_else(|p| p.into_inner());
                *lost = (lost.0 + spans, Some(error.to_string()));
            }
            result
        }

        fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
            self.inner.shutdown_with_timeout(timeout)
        }

        fn force_flush(&self) -> OTelSdkResult {
            self.inner.force_flush()
        }

        fn set_resource(&mut self, resource: &Resource) {
            self.inner.set_resource(resource);
        }
    }

    /// A subscriber that turns the executor's spans (target `fanout`) into
    /// OpenTelemetry spans of `provider`, and ignores every other span.
    pub fn subscriber(provider: &SdkTracerProvider) -> impl tracing::Subscriber + Send + Sync {
        let tracer = provider.tracer("fanout");
        let only_ours = Targets::new().with_target("fanout", tracing::Level::INFO);
        tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(only_ours))
    }
}

#[cfg(all(test, feature = "otlp"))]
mod tests {
    use std::time::Duration;

    use fanout::{Behavior, Executor, HedgePolicy, MockProvider, Request, Task};
    use opentelemetry::trace::{SpanId, SpanKind, Status};
    use opentelemetry::{Key, Value};
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};
    use tracing::Instrument;

    use super::{Telemetry, otlp};

    fn attribute(span: &SpanData, key: &str) -> Option<Value> {
        span.attributes
            .iter()
            .find(|kv| kv.key == Key::new(key.to_owned()))
            .map(|kv| kv.value.clone())
    }

    fn text(span: &SpanData, key: &str) -> Option<String> {
        attribute(span, key).map(|value| value.as_str().into_owned())
    }

    fn named<'a>(spans: &'a [SpanData], name: &str) -> Vec<&'a SpanData> {
        spans.iter().filter(|span| span.name == name).collect()
    }

    /// The spans of a run of two tasks: one answers at once; the other's
    /// first call fails with a 500, its retry straggles and is hedged at 1 s,
    /// and the hedge wins (so the retry is cut).
    async fn spans_of_a_run(content: bool) -> Vec<SpanData> {
        let exporter = InMemorySpanExporter::default();
        let provider = otlp::provider(exporter.clone());
        let _subscriber = tracing::subscriber::set_default(otlp::subscriber(&provider));
        let mock = MockProvider::new().with_latency(Duration::from_millis(100));
        mock.script(
            "flaky",
            [Behavior::server_error(), Behavior::reply("slow").after(Duration::from_secs(10))],
        );
        let executor = Executor::builder(mock)
            .probe(false)
            .hedge(Some(HedgePolicy::after(Duration::from_secs(1)).with_budget(1.0)))
            .span_content(content)
            .build();
        let request =
            |prompt: &str| Request::user(prompt).with_model("gpt-test").with_max_tokens(20);
        let tasks = [
            Task::with_id("steady", request("steady question")),
            Task::with_id("flaky", request("flaky")),
        ];
        let report = executor.run(tasks).instrument(Telemetry::root("test")).await;
        assert!(report.results.iter().all(|r| r.outcome.is_success()));
        provider.force_flush().unwrap();
        exporter.get_finished_spans().unwrap()
    }

    /// Command → run → task → call, with the GenAI conventions' attributes on
    /// each call: retries, hedges, failures and the cut call each told apart.
    #[tokio::test(start_paused = true)]
    async fn a_run_is_a_tree_of_spans_with_the_gen_ai_attributes() {
        let spans = spans_of_a_run(false).await;
        let [root] = named(&spans, "fanout test")[..] else { panic!("one root: {spans:#?}") };
        let [run] = named(&spans, "fanout.run")[..] else { panic!("one run span") };
        assert_eq!(root.parent_span_id, SpanId::INVALID);
        assert_eq!(run.parent_span_id, root.span_context.span_id());
        assert_eq!(text(run, "gen_ai.provider.name").as_deref(), Some("mock"));
        let tasks = named(&spans, "fanout.task");
        assert_eq!(tasks.len(), 2);
        assert!(tasks.iter().all(|t| t.parent_span_id == run.span_context.span_id()));
        let task = |id: &str| {
            *tasks.iter().find(|t| text(t, "fanout.task.id").as_deref() == Some(id)).unwrap()
        };
        let calls = named(&spans, "chat gpt-test");
        assert_eq!(calls.len(), 4, "one call for the steady task, three for the flaky one");
        for call in &calls {
            assert_eq!(call.span_kind, SpanKind::Client);
            assert_eq!(text(call, "gen_ai.operation.name").as_deref(), Some("chat"));
            assert_eq!(text(call, "gen_ai.provider.name").as_deref(), Some("mock"));
            assert_eq!(text(call, "gen_ai.request.model").as_deref(), Some("gpt-test"));
            assert_eq!(attribute(call, "gen_ai.request.max_tokens"), Some(Value::I64(20)));
            assert!(call.span_context.trace_id() == root.span_context.trace_id());
            assert!(attribute(call, "gen_ai.input.messages").is_none(), "no content by default");
            assert!(attribute(call, "gen_ai.output.messages").is_none());
        }
        let of = |task_id: &str| {
            let parent = task(task_id).span_context.span_id();
            let mut calls: Vec<_> = calls.iter().filter(|c| c.parent_span_id == parent).collect();
            calls.sort_by_key(|c| c.start_time);
            calls
                .iter()
                .map(|c| {
                    (text(c, "fanout.call.role").unwrap(), text(c, "fanout.call.end").unwrap())
                })
                .collect::<Vec<_>>()
        };
        let pair = |role: &str, end: &str| (role.to_owned(), end.to_owned());
        assert_eq!(of("steady"), [pair("first", "answered")]);
        assert_eq!(
            of("flaky"),
            [pair("first", "failed"), pair("retry", "cancelled"), pair("hedge", "answered")]
        );
        let failed =
            calls.iter().find(|c| text(c, "fanout.call.end").as_deref() == Some("failed")).unwrap();
        assert_eq!(text(failed, "error.type").as_deref(), Some("server"));
        assert_eq!(attribute(failed, "http.response.status_code"), Some(Value::I64(500)));
        assert!(matches!(failed.status, Status::Error { .. }));
        let answered = calls
            .iter()
            .find(|c| text(c, "fanout.call.end").as_deref() == Some("answered"))
            .unwrap();
        assert!(
            matches!(attribute(answered, "gen_ai.usage.input_tokens"), Some(Value::I64(n)) if n > 0)
        );
        assert!(
            matches!(attribute(answered, "gen_ai.usage.output_tokens"), Some(Value::I64(n)) if n > 0)
        );
        assert_eq!(text(answered, "gen_ai.response.finish_reasons").as_deref(), Some("stop"));
        assert_eq!(text(task("flaky"), "fanout.task.status").as_deref(), Some("succeeded"));
        assert_eq!(attribute(task("flaky"), "fanout.task.attempts"), Some(Value::I64(2)));
    }

    /// With content opted in, the prompt and the answer are in the call's span.
    #[tokio::test(start_paused = true)]
    async fn prompts_and_answers_go_in_only_when_asked() {
        let spans = spans_of_a_run(true).await;
        let steady = spans
            .iter()
            .find(|s| {
                text(s, "gen_ai.input.messages").is_some_and(|m| m.contains("steady question"))
            })
            .expect("the prompt is in a span");
        let input: serde_json::Value =
            serde_json::from_str(&text(steady, "gen_ai.input.messages").unwrap()).unwrap();
        assert_eq!(input[0]["role"], "user");
        assert_eq!(input[0]["parts"][0]["content"], "steady question");
        let output: serde_json::Value =
            serde_json::from_str(&text(steady, "gen_ai.output.messages").unwrap()).unwrap();
        assert_eq!(output[0]["role"], "assistant");
        assert!(output[0]["parts"][0]["content"].as_str().unwrap().contains("steady question"));
    }

    #[test]
    fn the_traces_path_is_added_to_a_base_url_once() {
        assert_eq!(super::traces_url("http://127.0.0.1:4318"), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(super::traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(super::traces_url("http://c:4318/v1/traces"), "http://c:4318/v1/traces");
    }
}
