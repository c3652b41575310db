//! Idempotent replay: a request that carries a request id gets the reply it got the first time,
//! kept with the audit entry of the change, so a retry after a lost answer changes nothing twice.

use super::*;

impl LinkerApi {
    /// The first answer to an earlier request with this id, when there was one (within 24 hours).
    pub(super) async fn replay<M: sightline_proto::prost::Message + Default>(
        &self,
        method: &'static str,
        org_id: &str,
        request_id: Option<&str>,
    ) -> Result<Option<M>, Status> {
        let Some(id) = request_id else {
            return Ok(None);
        };
        let since = self.clock.now_ms() - idempotency::WINDOW_MS;
        let Some(sealed) = self
            .store
            .replay(org_id, method, &idempotency::request_key(id), since)
            .await
            .map_err(LinkerError::from)?
        else {
            return Ok(None);
        };
        let answer = idempotency::open(id, &reply_context(method, org_id), &sealed)
            .and_then(|plain| M::decode(plain.as_slice()).ok())
            .ok_or(LinkerError::Internal("a kept answer does not open".into()))?;
        Ok(Some(answer))
    }

    /// After storing a change that keeps its answer: when a concurrent request with the same id won
    /// (the kept answer already exists), its answer; otherwise the store's outcome.
    pub(super) async fn after_race<M: sightline_proto::prost::Message + Default>(
        &self,
        method: &'static str,
        org_id: &str,
        request_id: Option<&str>,
        stored: Result<(), crate::store::StoreError>,
    ) -> Result<Option<M>, Status> {
        match stored {
            Ok(()) => Ok(None),
            Err(crate::store::StoreError::AlreadyExists(_)) if request_id.is_some() => {
                match self.replay(method, org_id, request_id).await? {
                    Some(first) => Ok(Some(first)),
                    None => Err(LinkerError::AlreadyExists("record").into()),
                }
            }
            Err(error) => Err(LinkerError::from(error).into()),
        }
    }
}
