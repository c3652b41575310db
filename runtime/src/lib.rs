//! The runtime every Sightline service shares: typed settings, tracing, TLS through rustls, the gRPC
//! server bootstrap (health, reflection, limits, graceful shutdown), storage from one URL, bearer
//! tokens and the cached credential client, per-tenant rate limits, and the injectable clock.
//!
//! Domain logic does not live here: each service owns its rules and its tables.

pub mod audited;
pub mod auth;
pub mod client;
pub mod clock;
pub mod deadline;
pub mod directory;
pub mod idempotency;
pub mod ids;
pub mod location;
pub mod metrics;
pub mod paging;
pub mod policy_stream;
pub mod pseudonym;
pub mod ratelimit;
pub mod sched;
pub mod scrub;
pub mod secret_file;
pub mod server;
pub mod settings;
pub mod sql;
pub mod storage;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod text;
pub mod time;
pub mod tls;
pub mod token;

pub use clock::{Clock, ManualClock, SharedClock, SystemClock};
pub use settings::{Secret, Settings};
