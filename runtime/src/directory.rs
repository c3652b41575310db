//! [`Directory`]: asks linker-svc whether an org exists and whether an instance is one of its
//! instances, so a service never stores or audits anything under an id that is not real or not the
//! caller's org's. Positive answers are cached (orgs are never deleted and instances never change
//! org); negative ones are not, so a new org is seen at once.

use std::time::Duration;

use moka::sync::Cache;
use sightline_proto::linker::v1::ListInstancesRequest;
use sightline_proto::linker::v1::linker_service_client::LinkerServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::auth::authorize;
use crate::settings::Secret;

const CACHE_ENTRIES: u64 = 100_000;
const CACHE_TTL: Duration = Duration::from_secs(600);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct Directory {
    linker: LinkerServiceClient<Channel>,
    service_token: Secret,
    /// `org` or `org/instance` keys known to exist.
    known: Cache<String, ()>,
}

impl Directory {
    pub fn new(linker: Channel, service_token: Secret) -> Self {
        Self {
            linker: LinkerServiceClient::new(linker),
            service_token,
            known: Cache::builder()
                .max_capacity(CACHE_ENTRIES)
                .time_to_live(CACHE_TTL)
                .build(),
        }
    }

    /// OK when the org exists; NOT_FOUND when it does not; UNAVAILABLE when linker-svc cannot say.
    pub async fn require_org(&self, org_id: &str) -> Result<(), Status> {
        self.lookup(org_id, None).await
    }

    /// OK when `instance_id` is one of `org_id`'s instances (linked or unlinked); NOT_FOUND otherwise.
    pub async fn require_instance(&self, org_id: &str, instance_id: &str) -> Result<(), Status> {
        self.lookup(org_id, Some(instance_id)).await
    }

    async fn lookup(&self, org_id: &str, instance_id: Option<&str>) -> Result<(), Status> {
        let key = match instance_id {
            Some(instance) => format!("{org_id}/{instance}"),
            None => org_id.to_owned(),
        };
        if self.known.contains_key(&key) {
            return Ok(());
        }
        let mut request = tonic::Request::new(ListInstancesRequest {
            org_id: org_id.to_owned(),
            page_size: 1,
            page_token: String::new(),
            instance_id: instance_id.unwrap_or_default().to_owned(),
        });
        authorize(&mut request, &self.service_token)?;
        request.set_timeout(CALL_TIMEOUT);
        match self.linker.clone().list_instances(request).await {
            Ok(_) => {
                self.known.insert(key, ());
                Ok(())
            }
            Err(status) if status.code() == Code::NotFound => {
                Err(Status::not_found(match instance_id {
                    Some(_) => "instance_id: no such instance in this org",
                    None => "org_id: no such org",
                }))
            }
            Err(status) if status.code() == Code::InvalidArgument => {
                Err(Status::invalid_argument(status.message().to_owned()))
            }
            Err(status) => Err(Status::unavailable(format!(
                "linker-svc cannot check the id: {}",
                status.message()
            ))),
        }
    }
}
