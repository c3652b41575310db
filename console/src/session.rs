//! Signed-in sessions, held in memory only: a random id (the cookie) maps to the token the person
//! pasted, whose it is, a CSRF token, and what is to be shown once (a new secret, a form's error).
//! A session ends on sign-out, after `idle_ms` without a request, or when the console restarts.

use std::collections::HashMap;
use std::sync::Mutex;

use rand::RngCore;
use sightline_runtime::{Secret, SharedClock};

/// Who a session belongs to, as linker-svc said at sign-in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Who {
    Operator,
    Admin { org_id: String, token_id: String },
}

/// Shown once, on the next page that asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Flash {
    /// A secret just issued: what it is (e.g. "link key"), its id and the secret itself.
    Secret {
        what: &'static str,
        id: String,
        secret: Secret,
    },
    /// A form's outcome: which form, and the service's message.
    Message {
        form: &'static str,
        error: bool,
        text: String,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub token: Secret,
    pub who: Who,
    pub csrf: String,
    last_seen_ms: i64,
    flashes: Vec<Flash>,
}

#[derive(Debug)]
pub(crate) struct Sessions {
    clock: SharedClock,
    idle_ms: i64,
    max: usize,
    held: Mutex<HashMap<String, Session>>,
}

/// 32 random bytes, hex: a session id or a CSRF token.
pub(crate) fn random_id() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

impl Sessions {
    pub(crate) fn new(clock: SharedClock, idle_ms: u64, max: usize) -> Self {
        Self {
            clock,
            idle_ms: i64::try_from(idle_ms).unwrap_or(i64::MAX),
            max: max.max(1),
            held: Mutex::new(HashMap::new()),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        // A poisoned map only means a panic elsewhere while it was held; its entries stay valid.
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts a session; returns its id.
    pub(crate) fn start(&self, token: Secret, who: Who) -> String {
        let now = self.clock.now_ms();
        let id = random_id();
        let mut held = self.held();
        held.retain(|_, s| now - s.last_seen_ms < self.idle_ms);
        while held.len() >= self.max {
            let oldest = held
                .iter()
                .min_by_key(|(_, s)| s.last_seen_ms)
                .map(|(id, _)| id.clone());
            match oldest {
                Some(oldest) => held.remove(&oldest),
                None => break,
            };
        }
        held.insert(
            id.clone(),
            Session {
                token,
                who,
                csrf: random_id(),
                last_seen_ms: now,
                flashes: Vec::new(),
            },
        );
        id
    }

    /// The session with this id, if it is live; a request renews it.
    pub(crate) fn touch(&self, id: &str) -> Option<Session> {
        let now = self.clock.now_ms();
        let mut held = self.held();
        let live = held
            .get(id)
            .is_some_and(|s| now - s.last_seen_ms < self.idle_ms);
        if !live {
            held.remove(id);
            return None;
        }
        let session = held.get_mut(id)?;
        session.last_seen_ms = now;
        Some(session.clone())
    }

    pub(crate) fn end(&self, id: &str) {
        self.held().remove(id);
    }

    pub(crate) fn flash(&self, id: &str, flash: Flash) {
        if let Some(session) = self.held().get_mut(id) {
            session.flashes.push(flash);
        }
    }

    /// Takes the session's flashes: each is shown once.
    pub(crate) fn take_flashes(&self, id: &str) -> Vec<Flash> {
        self.held()
            .get_mut(id)
            .map(|s| std::mem::take(&mut s.flashes))
            .unwrap_or_default()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.held().len()
    }
}

#[cfg(test)]
mod tests {
    use sightline_runtime::ManualClock;

    use super::*;

    #[test]
    fn a_session_ends_when_idle_signed_out_or_pushed_out() {
        let clock = ManualClock::new(1_000_000);
        let sessions = Sessions::new(clock.clone(), 60_000, 2);
        let a = sessions.start(Secret::new("sla_a"), Who::Operator);
        assert_eq!(a.len(), 64);
        clock.advance_ms(59_000);
        assert!(
            sessions.touch(&a).is_some(),
            "renewed inside the idle limit"
        );
        clock.advance_ms(59_000);
        assert!(sessions.touch(&a).is_some(), "the last request renewed it");
        clock.advance_ms(60_000);
        assert!(sessions.touch(&a).is_none(), "idle for the whole limit");
        assert!(sessions.touch(&a).is_none());

        let b = sessions.start(Secret::new("sla_b"), Who::Operator);
        sessions.end(&b);
        assert!(sessions.touch(&b).is_none(), "signed out");

        let c = sessions.start(Secret::new("sla_c"), Who::Operator);
        clock.advance_ms(1);
        let d = sessions.start(Secret::new("sla_d"), Who::Operator);
        clock.advance_ms(1);
        let e = sessions.start(Secret::new("sla_e"), Who::Operator);
        assert_eq!(sessions.len(), 2);
        assert!(sessions.touch(&c).is_none(), "the least recently used went");
        assert!(sessions.touch(&d).is_some() && sessions.touch(&e).is_some());
        assert_ne!(
            sessions.touch(&d).map(|s| s.csrf),
            sessions.touch(&e).map(|s| s.csrf)
        );
    }

    #[test]
    fn a_flash_is_shown_once() {
        let sessions = Sessions::new(ManualClock::new(0), 60_000, 10);
        let id = sessions.start(Secret::new("sla_a"), Who::Operator);
        sessions.flash(
            &id,
            Flash::Message {
                form: "consent",
                error: true,
                text: "reason: is required".into(),
            },
        );
        assert_eq!(sessions.take_flashes(&id).len(), 1);
        assert!(sessions.take_flashes(&id).is_empty());
    }
}
