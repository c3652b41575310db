//! Who is calling: resolves an admin token, an instance credential or a service token to a
//! principal, against the store (by digest) and the configured secrets, with a short cache and
//! the failure limiter in front.

use super::*;

/// How long other services may cache a ValidateCredential answer.
pub(super) const VALIDATION_CACHE_TTL_MS: u32 = 2_000;
/// last_used_at is written at most this often per secret, so validation stays a read.
pub(super) const TOUCH_INTERVAL_MS: i64 = 60_000;

/// Resolves tokens to principals against the store and the configured secrets.
#[derive(Debug)]
pub struct Authority {
    pub(super) store: Arc<dyn LinkerStore>,
    pub(super) clock: SharedClock,
    pub(super) operator_digest: [u8; 32],
    pub(super) service_digests: Vec<[u8; 32]>,
    pub(super) limiter: RateLimiter,
    pub(super) failures: FailureLimiter,
    /// The server's longest call (`limits.request_timeout_ms`).
    pub(super) call_limit: std::time::Duration,
}

impl Authority {
    pub fn new(
        store: Arc<dyn LinkerStore>,
        clock: SharedClock,
        operator_token: &str,
        service_tokens: &[&str],
        limits: &Limits,
    ) -> Self {
        Self {
            store,
            clock,
            operator_digest: token::digest(operator_token),
            service_digests: service_tokens.iter().map(|t| token::digest(t)).collect(),
            limiter: RateLimiter::new("linker", limits),
            failures: FailureLimiter::new("linker", limits),
            call_limit: std::time::Duration::from_millis(limits.request_timeout_ms),
        }
    }

    /// The caller of a request, rate-limited per tenant (services are not:
    /// [`RateLimiter::check_caller`]). A peer that keeps presenting bad
    /// tokens is refused before its next one costs a store lookup; configured tokens (operator,
    /// services) cost none and are never refused for their address's failures, so a flood from
    /// the host a service runs on cannot cut that service off, and a token found valid lately is
    /// looked up whatever its address did (see [`FailureLimiter`]).
    pub(super) async fn caller<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let peer = PeerKey::of_request(request);
        let presented =
            auth::bearer(request.metadata()).inspect_err(|_| self.failures.charge(peer))?;
        let parsed = match token::parse(presented) {
            Ok(parsed) => parsed,
            Err(error) => {
                self.failures.check(peer)?;
                self.failures.charge(peer);
                return Err(malformed(error).into());
            }
        };
        let digest = parsed.digest();
        let configured = matches!(parsed.kind, TokenKind::Operator | TokenKind::Service);
        if !configured {
            self.failures.check_token(peer, &digest)?;
        }
        let principal = match self.resolve_parsed(parsed.kind, &digest).await {
            Ok(principal) => principal,
            Err(error) => {
                if matches!(error, LinkerError::Unauthenticated(_)) {
                    self.failures.charge(peer);
                    self.failures.vouch(digest, false);
                }
                return Err(error.into());
            }
        };
        if !configured {
            self.failures.vouch(digest, true);
        }
        self.limiter.check_caller(&principal)?;
        Ok(principal)
    }

    /// Whose `presented` is. Link keys are not bearer tokens outside LinkInstance.
    pub async fn resolve(&self, presented: &str) -> Result<Principal, LinkerError> {
        let parsed = token::parse(presented).map_err(malformed)?;
        self.resolve_parsed(parsed.kind, &parsed.digest()).await
    }

    /// Whose the token of `kind` with `digest` is (the token parsed and digested once per call).
    pub(super) async fn resolve_parsed(
        &self,
        kind: TokenKind,
        digest: &[u8; 32],
    ) -> Result<Principal, LinkerError> {
        let digest = *digest;
        let now = self.clock.now_ms();
        match kind {
            TokenKind::Operator if token::digests_equal(&digest, &self.operator_digest) => {
                Ok(Principal::Operator)
            }
            TokenKind::Service
                if self
                    .service_digests
                    .iter()
                    .any(|d| token::digests_equal(&digest, d)) =>
            {
                Ok(Principal::Service {
                    name: "sightline".to_owned(),
                })
            }
            TokenKind::Admin => {
                let found = self.store.find_admin_token(&digest).await?;
                let found = found
                    .filter(|f| token::digests_equal(&f.digest, &digest))
                    .ok_or_else(|| LinkerError::Unauthenticated("unknown admin token".into()))?;
                if found.record.revoked_at.is_some() {
                    return Err(LinkerError::Unauthenticated(
                        "admin token has been revoked".into(),
                    ));
                }
                if stale(found.record.last_used_at, now) {
                    self.store.touch_admin_token(&found.record.id, now).await?;
                }
                Ok(Principal::Admin {
                    org_id: found.record.org_id,
                    token_id: found.record.id,
                })
            }
            TokenKind::Instance => {
                let found = self.store.find_credential(&digest).await?;
                let found = found
                    .filter(|f| token::digests_equal(&f.digest, &digest))
                    .ok_or_else(|| {
                        LinkerError::Unauthenticated("unknown instance credential".into())
                    })?;
                if found.record.revoked_at.is_some() || found.instance_unlinked {
                    return Err(LinkerError::Unauthenticated(
                        "instance credential has been revoked".into(),
                    ));
                }
                if stale(found.record.last_used_at, now) {
                    self.store.touch_credential(&found.record.id, now).await?;
                }
                Ok(Principal::Instance {
                    org_id: found.record.org_id,
                    instance_id: found.record.instance_id,
                    credential_id: found.record.id,
                })
            }
            TokenKind::LinkKey => Err(LinkerError::Unauthenticated(
                "a link key only authorises LinkInstance".into(),
            )),
            TokenKind::Operator | TokenKind::Service => Err(LinkerError::Unauthenticated(format!(
                "unknown {}",
                kind.noun()
            ))),
        }
    }
}

pub(super) fn malformed(error: token::TokenError) -> LinkerError {
    LinkerError::Unauthenticated(format!("malformed token: {error}"))
}

pub(super) fn stale(last_used_at: Option<i64>, now: i64) -> bool {
    last_used_at.is_none_or(|at| now - at >= TOUCH_INTERVAL_MS)
}
