//! How a server's threads are scheduled by the kernel (the `scheduling` setting).
//!
//! Under `batch` (the default) the threads run under Linux's `SCHED_BATCH`: the same share of the
//! CPU as `SCHED_OTHER` at the same nice value, but a thread that wakes up does not preempt the one
//! running. A store's one writer (SQLite's) is then not cut off mid-statement every time a gRPC
//! worker, the committer or a sync thread wakes on its core, which on two cores was a sixth of its
//! time spent waiting for a CPU while a third of the machine was idle; a woken thread takes an
//! idle core when there is one, and otherwise waits for the running thread's slice (a few
//! milliseconds at most). Measured in BENCHMARKS.md (collector-svc: ingest).

use serde::Deserialize;

/// The kernel's scheduling policy for a server's threads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduling {
    /// `SCHED_BATCH`: woken threads do not preempt running ones.
    #[default]
    Batch,
    /// `SCHED_OTHER`, the kernel's default.
    Normal,
}

impl Scheduling {
    /// The setting as the settings file (if any) and `SIGHTLINE_*` give it; the default when they
    /// do not load (what does not load is reported by whoever loads them for real).
    pub fn configured(file: Option<&std::path::Path>) -> Self {
        crate::Settings::load(file)
            .map(|s| s.scheduling)
            .unwrap_or_default()
    }
}

/// Puts the calling thread under `scheduling`, keeping its nice value. Threads it starts afterwards
/// inherit the policy, so a process calls this on its main thread before it starts any other
/// (before its async runtime). Other platforms than Linux keep their default.
pub fn apply(scheduling: Scheduling) -> Result<(), String> {
    #[cfg(target_os = "linux")]
    {
        use thread_priority::{
            NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
            set_thread_priority_and_policy, thread_native_id,
        };
        let policy = ThreadSchedulePolicy::Normal(match scheduling {
            Scheduling::Batch => NormalThreadSchedulePolicy::Batch,
            Scheduling::Normal => NormalThreadSchedulePolicy::Other,
        });
        // The crate sets the nice value with the policy: the one it maps to the thread's own.
        let nice = current_nice()?;
        let priority = (0..=99u8)
            .filter_map(|p| ThreadPriority::try_from(p).ok())
            .find(|p| p.to_posix(policy).ok() == Some(nice))
            .ok_or_else(|| format!("no priority keeps nice {nice}"))?;
        set_thread_priority_and_policy(thread_native_id(), priority, policy)
            .map_err(|e| format!("scheduling {scheduling:?}: {e:?}"))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = scheduling;
        Ok(())
    }
}

/// The calling thread's nice value (field 19 of /proc/thread-self/stat).
#[cfg(target_os = "linux")]
fn current_nice() -> Result<i32, String> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat")
        .map_err(|e| format!("/proc/thread-self/stat: {e}"))?;
    stat_field(&stat, 19)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| "/proc/thread-self/stat: no nice value".to_owned())
}

/// Field `n` (1-based, as proc(5) numbers them) of a /proc stat line; the second field, the
/// command name in parentheses, may itself hold spaces and parentheses.
pub fn stat_field(stat: &str, n: usize) -> Option<&str> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(n.checked_sub(3)?)
}

/// The scheduling policy of every thread of process `pid` (field 41 of its threads' stat):
/// 0 `SCHED_OTHER`, 3 `SCHED_BATCH`. For tests and diagnostics.
pub fn thread_policies(pid: u32) -> std::io::Result<Vec<(String, u32)>> {
    let mut policies = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path();
        // A thread that ended since the listing is skipped.
        let (Ok(stat), Ok(name)) = (
            std::fs::read_to_string(path.join("stat")),
            std::fs::read_to_string(path.join("comm")),
        ) else {
            continue;
        };
        if let Some(policy) = stat_field(&stat, 41).and_then(|f| f.parse().ok()) {
            policies.push((name.trim().to_owned(), policy));
        }
    }
    Ok(policies)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_past_a_command_with_spaces_and_parentheses() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 5 1 0";
        assert_eq!(stat_field(stat, 3), Some("S"));
        assert_eq!(stat_field(stat, 18), Some("20"));
        assert_eq!(stat_field(stat, 19), Some("5"));
        assert_eq!(stat_field(stat, 2), None);
        assert_eq!(stat_field("no parenthesis", 3), None);
    }

    /// A thread put under batch is SCHED_BATCH with its nice value unchanged, threads it starts
    /// inherit it, and normal puts it back.
    #[test]
    fn batch_is_inherited_and_keeps_the_nice_value() {
        std::thread::spawn(|| {
            let nice = current_nice().unwrap();
            let tid = || {
                std::fs::read_link("/proc/thread-self")
                    .unwrap()
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            };
            let policy = |tid: &str| -> u32 {
                let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
                stat_field(&stat, 41).unwrap().parse().unwrap()
            };
            apply(Scheduling::Batch).unwrap();
            assert_eq!(policy(&tid()), 3, "SCHED_BATCH");
            assert_eq!(current_nice().unwrap(), nice);
            let child = std::thread::spawn(move || policy(&tid())).join().unwrap();
            assert_eq!(child, 3, "a thread started under batch inherits it");
            let all = thread_policies(std::process::id()).unwrap();
            assert!(all.iter().any(|(_, p)| *p == 3), "{all:?}");
            apply(Scheduling::Normal).unwrap();
            assert_eq!(policy(&tid()), 0, "SCHED_OTHER");
            assert_eq!(current_nice().unwrap(), nice);
        })
        .join()
        .unwrap();
    }
}
