use std::path::{Path, PathBuf};

use fanout::{ErrorKind, ProviderError};

/// What can go wrong finding, loading or running a local model.
#[derive(Debug)]
pub enum LocalError {
    /// No model file where one was looked for; the message says the command that fixes it.
    NotFound(String),
    /// Reading or writing a file or folder failed.
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the system reported.
        error: std::io::Error,
    },
    /// The file is not a GGUF model fanout can run.
    Format {
        /// The model file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Fetching the model failed.
    Download(String),
    /// The text could not be tokenized.
    Tokenizer(String),
    /// The chat template could not render the conversation.
    Template(String),
    /// The prompt is empty, or does not fit the model's context length or
    /// the KV memory budget.
    PromptTooLong(String),
    /// The response format's schema cannot constrain decoding.
    Schema(String),
    /// The scheduler could not start or stopped, or a forward pass failed.
    Engine(String),
}

impl LocalError {
    pub(crate) fn io(path: &Path, error: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), error }
    }
}

impl std::fmt::Display for LocalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotFound(message) | Self::Download(message) | Self::Engine(message) => {
                f.write_str(message)
            }
            Self::Io { path, error } => write!(f, "{}: {error}", path.display()),
            Self::Format { path, message } => write!(f, "{}: {message}", path.display()),
            Self::Tokenizer(message) => write!(f, "tokenizer: {message}"),
            Self::Template(message) => write!(f, "chat template: {message}"),
            Self::PromptTooLong(message) => f.write_str(message),
            Self::Schema(message) => {
                write!(f, "the schema cannot constrain the local model's answer: {message}")
            }
        }
    }
}

impl std::error::Error for LocalError {}

impl From<LocalError> for ProviderError {
    fn from(error: LocalError) -> Self {
        let kind = match &error {
            LocalError::PromptTooLong(_)
            | LocalError::Schema(_)
            | LocalError::Template(_)
            | LocalError::Tokenizer(_) => ErrorKind::BadRequest,
            LocalError::NotFound(_) => ErrorKind::NotFound,
            _ => ErrorKind::Server,
        };
        ProviderError::new(kind, error.to_string())
    }
}
