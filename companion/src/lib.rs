//! The Sightline companion: the agent beside a customer's instance (SPEC K1–K4). It links the
//! instance and keeps its secrets in an encrypted vault, follows the instance's policy, samples host
//! and product metrics, spools them under `analytics-logs/`, uploads them to collector-svc (deleting
//! only what was acknowledged), previews what it would send, and writes support bundles.

pub mod bundle;
pub mod client;
pub mod commands;
pub mod progress;
pub mod run;
pub mod sampler;
pub mod spool;
pub mod status;
pub mod vault;
