//! The audit chain's hashing and verification. An entry's hash covers its canonical bytes (documented
//! on `sightline.audit.v1.AuditEvent.hash`) and the previous entry's hash, so editing, removing or
//! reordering any entry breaks the chain from that entry on.

use sha2::{Digest, Sha256};

use crate::store::{AuditHead, AuditRecord};

/// The hash the first entry of every chain links to.
pub const GENESIS: [u8; 32] = [0; 32];

/// The canonical fields of an entry.
#[derive(Debug, Clone, Copy)]
pub struct Canonical<'a> {
    pub org_id: &'a str,
    pub seq: i64,
    pub occurred_at: i64,
    pub actor: &'a str,
    pub service: &'a str,
    pub action: &'a str,
    pub target: &'a str,
    pub attributes_json: &'a str,
    pub prev_hash: &'a [u8],
}

pub fn hash(entry: Canonical<'_>) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"sightline-audit-v1\n");
    for field in [
        entry.org_id,
        &entry.seq.to_string(),
        &entry.occurred_at.to_string(),
        entry.actor,
        entry.service,
        entry.action,
        entry.target,
        entry.attributes_json,
        &hex::encode(entry.prev_hash),
    ] {
        hasher.update(field.as_bytes());
        hasher.update(b"\n");
    }
    hasher.finalize().into()
}

impl AuditRecord {
    pub fn canonical(&self) -> Canonical<'_> {
        Canonical {
            org_id: &self.org_id,
            seq: self.seq,
            occurred_at: self.occurred_at,
            actor: &self.actor,
            service: &self.service,
            action: &self.action,
            target: &self.target,
            attributes_json: &self.attributes,
            prev_hash: &self.prev_hash,
        }
    }
}

/// The result of checking a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainCheck {
    Intact {
        entries: u64,
        head: Vec<u8>,
    },
    Broken {
        entries: u64,
        first_bad_seq: u64,
        problem: &'static str,
    },
}

/// Walks a chain page by page. Feed entries in seq order, then call [`ChainVerifier::finish`] with
/// the head recorded on the org.
#[derive(Debug)]
pub struct ChainVerifier {
    expected_seq: i64,
    prev_hash: Vec<u8>,
    checked: u64,
    broken: Option<(u64, &'static str)>,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self {
            expected_seq: 1,
            prev_hash: GENESIS.to_vec(),
            checked: 0,
            broken: None,
        }
    }
}

impl ChainVerifier {
    /// Checks one entry; returns false once the chain is known to be broken.
    pub fn feed(&mut self, entry: &AuditRecord) -> bool {
        if self.broken.is_some() {
            return false;
        }
        self.checked += 1;
        let seq = u64::try_from(self.expected_seq).unwrap_or(0);
        let problem = if entry.seq != self.expected_seq {
            Some("entry missing")
        } else if entry.prev_hash != self.prev_hash {
            Some("previous-hash link broken")
        } else if hash(entry.canonical()).as_slice() != entry.hash.as_slice() {
            Some("hash mismatch: entry was edited")
        } else {
            None
        };
        if let Some(problem) = problem {
            self.broken = Some((seq, problem));
            return false;
        }
        self.prev_hash.clone_from(&entry.hash);
        self.expected_seq += 1;
        true
    }

    pub fn finish(self, head: &AuditHead) -> ChainCheck {
        let entries = self.checked;
        if let Some((first_bad_seq, problem)) = self.broken {
            return ChainCheck::Broken {
                entries,
                first_bad_seq,
                problem,
            };
        }
        let last_seq = self.expected_seq - 1;
        if last_seq < head.seq {
            return ChainCheck::Broken {
                entries,
                first_bad_seq: u64::try_from(last_seq + 1).unwrap_or(0),
                problem: "entry missing",
            };
        }
        if self.prev_hash != head.hash {
            return ChainCheck::Broken {
                entries,
                first_bad_seq: u64::try_from(last_seq).unwrap_or(0),
                problem: "chain head does not match the recorded head",
            };
        }
        ChainCheck::Intact {
            entries,
            head: self.prev_hash,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<AuditRecord> {
        let mut prev = GENESIS.to_vec();
        (1..=n)
            .map(|seq| {
                let mut record = AuditRecord {
                    org_id: "org".into(),
                    seq,
                    occurred_at: 1_000 + seq,
                    actor: "operator".into(),
                    service: "linker".into(),
                    action: "test.action".into(),
                    target: format!("t{seq}"),
                    attributes: "{}".into(),
                    prev_hash: prev.clone(),
                    hash: Vec::new(),
                };
                record.hash = hash(record.canonical()).to_vec();
                prev.clone_from(&record.hash);
                record
            })
            .collect()
    }

    fn check(entries: &[AuditRecord], head: &AuditHead) -> ChainCheck {
        let mut verifier = ChainVerifier::default();
        for entry in entries {
            if !verifier.feed(entry) {
                break;
            }
        }
        verifier.finish(head)
    }

    fn head_of(entries: &[AuditRecord]) -> AuditHead {
        let last = entries.last().unwrap();
        AuditHead {
            seq: last.seq,
            hash: last.hash.clone(),
        }
    }

    #[test]
    fn an_untouched_chain_is_intact() {
        let entries = chain(5);
        assert!(matches!(
            check(&entries, &head_of(&entries)),
            ChainCheck::Intact { entries: 5, .. }
        ));
    }

    #[test]
    fn an_edited_entry_is_named() {
        let mut entries = chain(5);
        let head = head_of(&entries);
        entries[2].target = "forged".into();
        assert_eq!(
            check(&entries, &head),
            ChainCheck::Broken {
                entries: 3,
                first_bad_seq: 3,
                problem: "hash mismatch: entry was edited"
            }
        );
    }

    #[test]
    fn a_removed_entry_is_named_in_the_middle_and_at_the_end() {
        let mut entries = chain(5);
        let head = head_of(&entries);
        entries.remove(1);
        assert!(matches!(
            check(&entries, &head),
            ChainCheck::Broken {
                first_bad_seq: 2,
                problem: "entry missing",
                ..
            }
        ));
        let mut entries = chain(5);
        entries.pop();
        assert!(matches!(
            check(&entries, &head),
            ChainCheck::Broken {
                first_bad_seq: 5,
                problem: "entry missing",
                ..
            }
        ));
    }
}
