//! Instance detection (SPEC L5): licenses registered to the org's verified domains, and app links that
//! the org's linked instances reported, each marked linked or not and how it was found.

use std::collections::HashSet;

use sightline_proto::common::v1 as common_pb;
use sightline_proto::linker::v1::{DetectedInstance, DetectionMethod};

use crate::store::DetectionInputs;

pub fn detect(inputs: &DetectionInputs) -> Vec<DetectedInstance> {
    let mut found = Vec::new();
    let mut seen_sens = HashSet::new();
    for license in &inputs.licenses {
        if !seen_sens.insert(license.sen.as_str()) {
            continue;
        }
        let linked = inputs
            .linked_instances
            .iter()
            .find(|i| !i.license_sen.is_empty() && i.license_sen == license.sen);
        found.push(DetectedInstance {
            method: DetectionMethod::LicenseDomain as i32,
            linked: linked.is_some(),
            instance_id: linked.map(|i| i.id.clone()).unwrap_or_default(),
            sen: license.sen.clone(),
            product: license.product.clone(),
            domain: license.domain.clone(),
            app_link: None,
            reported_by_instance_id: String::new(),
        });
    }
    let mut seen_links = HashSet::new();
    for link in &inputs.app_links {
        // One entry per far end: by server id when known, else by URL.
        let identity = if link.server_id.is_empty() {
            &link.url
        } else {
            &link.server_id
        };
        if !seen_links.insert(identity.as_str()) {
            continue;
        }
        let linked = inputs.linked_instances.iter().find(|i| {
            (!link.server_id.is_empty() && i.server_id == link.server_id) || i.base_url == link.url
        });
        found.push(DetectedInstance {
            method: DetectionMethod::AppLink as i32,
            linked: linked.is_some(),
            instance_id: linked.map(|i| i.id.clone()).unwrap_or_default(),
            sen: String::new(),
            product: String::new(),
            domain: String::new(),
            app_link: Some(common_pb::AppLink {
                url: link.url.clone(),
                product_family: link.product_family.clone(),
                server_id: link.server_id.clone(),
                version: link.version.clone(),
            }),
            reported_by_instance_id: link.instance_id.clone(),
        });
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AppLinkRecord, InstanceRecord, LicenseRecord};

    fn instance(id: &str, server_id: &str, sen: &str) -> InstanceRecord {
        InstanceRecord {
            id: id.into(),
            org_id: "org".into(),
            server_id: server_id.into(),
            base_url: format!("https://{server_id}.example.com"),
            product: "jira".into(),
            version: "9.12.0".into(),
            license_sen: sen.into(),
            node_count: 1,
            link_key_id: "k".into(),
            linked_at: 0,
            unlinked_at: None,
        }
    }

    #[test]
    fn marks_license_and_app_link_matches_linked_or_not() {
        let inputs = DetectionInputs {
            verified_domains: vec!["example.com".into()],
            licenses: vec![
                LicenseRecord {
                    sen: "SEN-1".into(),
                    product: "jira".into(),
                    domain: "example.com".into(),
                },
                LicenseRecord {
                    sen: "SEN-2".into(),
                    product: "confluence".into(),
                    domain: "wiki.example.com".into(),
                },
            ],
            linked_instances: vec![instance("i1", "S1", "SEN-1")],
            app_links: vec![
                AppLinkRecord {
                    instance_id: "i1".into(),
                    url: "https://wiki.example.com".into(),
                    product_family: "confluence".into(),
                    server_id: "S2".into(),
                    version: "8.5".into(),
                },
                AppLinkRecord {
                    instance_id: "i1".into(),
                    url: "https://S1.example.com".into(),
                    product_family: "jira".into(),
                    server_id: "S1".into(),
                    version: "9.12".into(),
                },
            ],
        };
        let found = detect(&inputs);
        assert_eq!(found.len(), 4);
        assert!(
            found[0].linked
                && found[0].instance_id == "i1"
                && found[0].method == DetectionMethod::LicenseDomain as i32
        );
        assert!(!found[1].linked && found[1].sen == "SEN-2");
        assert!(
            !found[2].linked
                && found[2].method == DetectionMethod::AppLink as i32
                && found[2].reported_by_instance_id == "i1"
        );
        assert!(found[3].linked);
    }
}
