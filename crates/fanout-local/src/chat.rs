//! Conversations to prompt text through the model's own chat template
//! (`tokenizer.chat_template`, a Jinja template written for Python's jinja2).

use fanout::{Message, Role};
use minijinja::{Environment, Error, ErrorKind, context};
use serde::Serialize;

use crate::LocalError;
use crate::gguf::GgufFile;
use crate::tokenizer::ChatTokenizer;

/// ChatML, for GGUF files that carry no template of their own.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

#[derive(Serialize)]
struct TemplateMessage<'a> {
    role: &'static str,
    content: &'a str,
}

impl ChatTemplate {
    pub fn from_gguf(gguf: &GgufFile, tokenizer: &ChatTokenizer) -> Result<Self, LocalError> {
        let source = gguf.optional_string("tokenizer.chat_template").unwrap_or(CHATML).to_owned();
        let mut env = Environment::new();
        // Templates call `raise_exception` (a transformers helper) to reject
        // conversations they cannot render.
        env.add_function("raise_exception", |message: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned("chat", source)
            .map_err(|e| gguf.format_error(format!("chat template does not parse: {e}")))?;
        Ok(Self {
            env,
            bos_token: tokenizer.bos.map(|id| tokenizer.token_text(id)).unwrap_or_default(),
            eos_token: tokenizer.token_text(tokenizer.eos),
        })
    }

    /// The prompt text for `messages`, ending where the assistant's answer begins.
    pub fn render(&self, messages: &[Message]) -> Result<String, LocalError> {
        let messages: Vec<_> = messages
            .iter()
            .map(|m| TemplateMessage {
                role: match m.role {
                    Role::System => "system",
                    Role::User => "user",
                    Role::Assistant => "assistant",
                    Role::Tool => "tool",
                },
                content: &m.content,
            })
            .collect();
        let template =
            self.env.get_template("chat").map_err(|e| LocalError::Template(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| LocalError::Template(e.to_string()))
    }
}
