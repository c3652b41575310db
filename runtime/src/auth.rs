//! Who is calling: bearer-token extraction, the [`Principal`] a token stands for, the org checks every
//! handler makes, and [`CredentialClient`], the cached `ValidateCredential` client other services use.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::sync::Cache;
use sightline_proto::linker::v1::linker_service_client::LinkerServiceClient;
use sightline_proto::linker::v1::{CredentialKind, ValidateCredentialRequest};
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::ratelimit::{FailureLimiter, PeerKey};
use crate::settings::{Limits, Secret};
use crate::token;

/// The caller of a request, once its token is validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Operator,
    Admin {
        org_id: String,
        token_id: String,
    },
    Instance {
        org_id: String,
        instance_id: String,
        credential_id: String,
    },
    Service {
        name: String,
    },
}

impl Principal {
    /// How the audit log names this caller. Ids only, never a secret.
    pub fn actor(&self) -> String {
        match self {
            Principal::Operator => "operator".to_owned(),
            Principal::Admin { token_id, .. } => format!("admin:{token_id}"),
            Principal::Instance { instance_id, .. } => format!("instance:{instance_id}"),
            Principal::Service { name } => format!("service:{name}"),
        }
    }

    /// The tenant a rate limit is counted against.
    pub fn tenant(&self) -> String {
        match self {
            Principal::Operator => "operator".to_owned(),
            Principal::Admin { org_id, .. } | Principal::Instance { org_id, .. } => {
                format!("org:{org_id}")
            }
            Principal::Service { name } => format!("service:{name}"),
        }
    }

    pub fn org_id(&self) -> Option<&str> {
        match self {
            Principal::Admin { org_id, .. } | Principal::Instance { org_id, .. } => Some(org_id),
            Principal::Operator | Principal::Service { .. } => None,
        }
    }

    /// Org admins of `org_id` and the operator may administer it.
    pub fn require_admin_of(&self, org_id: &str) -> Result<(), Status> {
        match self {
            Principal::Operator => Ok(()),
            Principal::Admin { org_id: own, .. } if own == org_id => Ok(()),
            _ => Err(Status::permission_denied(
                "caller may not administer this org",
            )),
        }
    }

    /// Admins of `org_id`, the operator, and services (enforcement points) may read it.
    pub fn require_reader_of(&self, org_id: &str) -> Result<(), Status> {
        match self {
            Principal::Service { .. } => Ok(()),
            _ => self.require_admin_of(org_id),
        }
    }

    pub fn require_operator(&self) -> Result<(), Status> {
        match self {
            Principal::Operator => Ok(()),
            _ => Err(Status::permission_denied("only the operator may do this")),
        }
    }

    pub fn require_service(&self) -> Result<(), Status> {
        match self {
            Principal::Service { .. } => Ok(()),
            _ => Err(Status::permission_denied("only services may do this")),
        }
    }
}

const MAX_TOKEN_BYTES: usize = 256;

/// The token in `authorization: Bearer <token>`.
pub fn bearer(metadata: &MetadataMap) -> Result<&str, Status> {
    let value = metadata
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing authorization metadata"))?
        .to_str()
        .map_err(|_| Status::unauthenticated("authorization metadata is not text"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| Status::unauthenticated("authorization must be 'Bearer <token>'"))?
        .trim();
    if token.is_empty() {
        return Err(Status::unauthenticated(
            "authorization bearer token is empty",
        ));
    }
    // Every Sightline token is under 50 characters; a huge one is refused before any work.
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Status::unauthenticated(
            "authorization bearer token is too long",
        ));
    }
    Ok(token)
}

/// Adds `authorization: Bearer <token>` to an outgoing request.
pub fn authorize<T>(request: &mut tonic::Request<T>, token: &Secret) -> Result<(), Status> {
    let value = format!("Bearer {}", token.expose())
        .parse()
        .map_err(|_| Status::internal("service token is not valid metadata"))?;
    request.metadata_mut().insert("authorization", value);
    Ok(())
}

/// Validates callers' tokens with linker-svc, caching each answer for the TTL linker gives (capped),
/// so revocations are seen within that TTL. Failures are cached for a shorter time, in a smaller
/// cache of their own, and charged to the peer that presented the token — here, at the edge where
/// it arrived, never to this service's own address at linker-svc: a peer past its failure budget is
/// refused before its next unknown token costs a lookup, unless the token was found valid lately
/// (see [`FailureLimiter`]). Both caches are bounded.
#[derive(Debug, Clone)]
pub struct CredentialClient {
    linker: LinkerServiceClient<Channel>,
    service_token: Secret,
    known: Cache<[u8; 32], Cached>,
    refused: Cache<[u8; 32], (Code, String)>,
    failures: Arc<FailureLimiter>,
    max_ttl: Duration,
}

#[derive(Debug, Clone)]
struct Cached {
    principal: Result<Principal, (Code, String)>,
    until: Instant,
}

const NEGATIVE_TTL: Duration = Duration::from_millis(500);
const MAX_KNOWN: u64 = 100_000;
const MAX_REFUSED: u64 = 10_000;

impl CredentialClient {
    /// `component` names the calling service in metrics.
    pub fn new(
        linker: Channel,
        service_token: Secret,
        component: &'static str,
        limits: &Limits,
    ) -> Self {
        let failures = Arc::new(FailureLimiter::new(component, limits));
        // This service's own token (the one its peers present too) needs no budget.
        failures.vouch(token::digest(service_token.expose()), true);
        Self {
            linker: LinkerServiceClient::new(linker),
            service_token,
            known: Cache::builder()
                .max_capacity(MAX_KNOWN)
                .time_to_live(Duration::from_secs(5))
                .build(),
            refused: Cache::builder()
                .max_capacity(MAX_REFUSED)
                .time_to_live(NEGATIVE_TTL)
                .build(),
            failures,
            max_ttl: Duration::from_secs(5),
        }
    }

    /// Resolves the bearer token of a request.
    /// The caller of `request`: authenticated, then admitted by `limiter`'s per-caller budget.
    /// Every service's handlers start here.
    pub async fn caller<T>(
        &self,
        request: &tonic::Request<T>,
        limiter: &crate::ratelimit::RateLimiter,
    ) -> Result<Principal, Status> {
        let principal = self.authenticate(request).await?;
        limiter.check_caller(&principal)?;
        Ok(principal)
    }

    pub async fn authenticate<T>(&self, request: &tonic::Request<T>) -> Result<Principal, Status> {
        let peer = PeerKey::of_request(request);
        let presented = bearer(request.metadata()).inspect_err(|_| self.failures.charge(peer))?;
        let parsed = token::parse(presented).map_err(|e| {
            self.failures.charge(peer);
            Status::unauthenticated(format!("malformed bearer token: {e}"))
        })?;
        let key = parsed.digest();
        if let Some(hit) = self.known.get(&key)
            && hit.until > Instant::now()
        {
            return hit
                .principal
                .clone()
                .map_err(|(code, message)| Status::new(code, message));
        }
        if let Some((code, message)) = self.refused.get(&key) {
            self.failures.charge(peer);
            return Err(Status::new(code, message));
        }
        // An unknown token costs a lookup: not for a peer that keeps failing.
        self.failures.check_token(peer, &key)?;
        let mut request = tonic::Request::new(ValidateCredentialRequest {
            credential: presented.to_owned(),
        });
        authorize(&mut request, &self.service_token)?;
        request.set_timeout(Duration::from_secs(5));
        let answer = self.linker.clone().validate_credential(request).await;
        let (principal, ttl) = match answer {
            Ok(reply) => {
                let reply = reply.into_inner();
                let ttl = Duration::from_millis(u64::from(reply.cache_ttl_ms)).min(self.max_ttl);
                (Ok(principal_from(reply)?), ttl)
            }
            Err(status) if status.code() == Code::Unauthenticated => (
                Err((Code::Unauthenticated, status.message().to_owned())),
                NEGATIVE_TTL,
            ),
            Err(status) => {
                return Err(Status::unavailable(format!(
                    "credential check unavailable: {}",
                    status.message()
                )));
            }
        };
        self.failures.vouch(key, principal.is_ok());
        match &principal {
            Ok(_) => self.known.insert(
                key,
                Cached {
                    principal: principal.clone(),
                    until: Instant::now() + ttl,
                },
            ),
            Err(refusal) => {
                self.failures.charge(peer);
                self.refused.insert(key, refusal.clone());
            }
        }
        principal.map_err(|(code, message)| Status::new(code, message))
    }
}

fn principal_from(
    reply: sightline_proto::linker::v1::ValidateCredentialResponse,
) -> Result<Principal, Status> {
    match reply.kind() {
        CredentialKind::Operator => Ok(Principal::Operator),
        CredentialKind::Admin => Ok(Principal::Admin {
            org_id: reply.org_id,
            token_id: reply.credential_id,
        }),
        CredentialKind::Instance => Ok(Principal::Instance {
            org_id: reply.org_id,
            instance_id: reply.instance_id,
            credential_id: reply.credential_id,
        }),
        CredentialKind::Service => Ok(Principal::Service {
            name: reply.credential_id,
        }),
        CredentialKind::Unspecified => Err(Status::internal("linker returned no credential kind")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(value: &str) -> MetadataMap {
        let mut map = MetadataMap::new();
        map.insert("authorization", value.parse().unwrap());
        map
    }

    #[test]
    fn bearer_needs_the_scheme_and_a_token() {
        assert_eq!(bearer(&metadata("Bearer abc")).unwrap(), "abc");
        assert_eq!(
            bearer(&MetadataMap::new()).unwrap_err().code(),
            Code::Unauthenticated
        );
        assert_eq!(
            bearer(&metadata("Basic abc")).unwrap_err().code(),
            Code::Unauthenticated
        );
        assert_eq!(
            bearer(&metadata("Bearer ")).unwrap_err().code(),
            Code::Unauthenticated
        );
    }

    #[test]
    fn admins_are_confined_to_their_org() {
        let admin = Principal::Admin {
            org_id: "a".into(),
            token_id: "t".into(),
        };
        assert!(admin.require_admin_of("a").is_ok());
        assert_eq!(
            admin.require_admin_of("b").unwrap_err().code(),
            Code::PermissionDenied
        );
        assert!(Principal::Operator.require_admin_of("b").is_ok());
        let instance = Principal::Instance {
            org_id: "a".into(),
            instance_id: "i".into(),
            credential_id: "c".into(),
        };
        assert!(instance.require_admin_of("a").is_err());
        assert!(admin.require_operator().is_err());
        assert_eq!(admin.actor(), "admin:t");
    }
}
