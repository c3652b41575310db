//! insights-svc: what vendors' and customers' admins look at (SPEC I1–I6).

pub mod health;
pub mod readiness;
pub mod rules;
pub mod store;
pub mod treat;
pub mod trends;
pub mod upload;
