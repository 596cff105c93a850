//! The pause every task of a provider honours after a 429.

use std::sync::Mutex;

use tokio::time::{Instant, sleep_until};

#[derive(Debug, Default)]
pub(crate) struct SharedPause {
    until: Mutex<Option<Instant>>,
}

impl SharedPause {
    /// Pauses everyone until `until`, unless an existing pause lasts longer.
    /// Returns whether the pause was extended.
    pub(crate) fn extend(&self, until: Instant) -> bool {
        let mut current = self.until.lock().unwrap();
        let extended = current.is_none_or(|c| until > c);
        if extended {
            *current = Some(until);
        }
        extended
    }

    /// Returns once no pause is in force (a pause extended meanwhile is waited out too).
    pub(crate) async fn wait(&self) {
        loop {
            let until = *self.until.lock().unwrap();
            match until {
                Some(until) if until > Instant::now() => sleep_until(until).await,
                _ => return,
            }
        }
    }
}
