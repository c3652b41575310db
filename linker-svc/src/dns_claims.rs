//! Domain-claim verification: a claim is verified when the domain publishes the claim's token in a
//! DNS TXT record at `_sightline-challenge.<domain>`.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

pub const TXT_PREFIX: &str = "_sightline-challenge.";
pub const TXT_VALUE_PREFIX: &str = "sightline-domain-verification=";

/// Looks up TXT records. The real one asks DNS; tests and air-gapped installs use [`StaticTxt`].
#[async_trait]
pub trait TxtResolver: Send + Sync + std::fmt::Debug + 'static {
    async fn txt(&self, name: &str) -> Result<Vec<String>, String>;
}

/// TXT lookups through the system's DNS configuration.
#[derive(Debug)]
pub struct DnsTxt {
    resolver: hickory_resolver::TokioResolver,
}

impl DnsTxt {
    pub fn from_system() -> Result<Self, String> {
        // DNSSEC validation stays off (the `dnssec-*` features are not enabled): the NSEC3 advisory
        // RUSTSEC-2026-0118 is reached only with it.
        let resolver = hickory_resolver::TokioResolver::builder_tokio()
            .map_err(|e| e.to_string())?
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self { resolver })
    }
}

#[async_trait]
impl TxtResolver for DnsTxt {
    async fn txt(&self, name: &str) -> Result<Vec<String>, String> {
        let lookup = self
            .resolver
            .txt_lookup(name)
            .await
            .map_err(|e| e.to_string())?;
        Ok(lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                hickory_resolver::proto::rr::RData::TXT(txt) => Some(
                    txt.txt_data
                        .iter()
                        .map(|part| String::from_utf8_lossy(part).into_owned())
                        .collect::<String>(),
                ),
                _ => None,
            })
            .collect())
    }
}

/// A fixed table of TXT records.
#[derive(Debug, Default)]
pub struct StaticTxt {
    records: Mutex<HashMap<String, Vec<String>>>,
}

impl StaticTxt {
    pub fn publish(&self, name: &str, value: &str) {
        if let Ok(mut records) = self.records.lock() {
            records
                .entry(name.to_owned())
                .or_default()
                .push(value.to_owned());
        }
    }
}

#[async_trait]
impl TxtResolver for StaticTxt {
    async fn txt(&self, name: &str) -> Result<Vec<String>, String> {
        Ok(self
            .records
            .lock()
            .map_err(|_| "records unavailable".to_owned())?
            .get(name)
            .cloned()
            .unwrap_or_default())
    }
}

pub fn record_name(domain: &str) -> String {
    format!("{TXT_PREFIX}{domain}")
}

pub fn record_value(token: &str) -> String {
    format!("{TXT_VALUE_PREFIX}{token}")
}
