//! An event's shape: required fields, enum values, lengths and numbers, checked before any
//! treatment; the message names the field.

use super::*;

fn check_text(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!("{field}: longer than {max} bytes"));
    }
    if value.contains('\0') {
        return Err(format!("{field}: holds a NUL character"));
    }
    Ok(())
}

fn check_required(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.trim().is_empty() {
        return Err(format!("{field}: is required"));
    }
    check_text(field, value, max)
}

fn check_map<V>(
    field: &str,
    map: &HashMap<String, V>,
    mut value: impl FnMut(&V) -> Result<(), String>,
) -> Result<(), String> {
    if map.len() > MAX_MAP_ENTRIES {
        return Err(format!("{field}: more than {MAX_MAP_ENTRIES} entries"));
    }
    for (key, v) in map {
        if key.trim().is_empty() || key.len() > MAX_TEXT || key.contains('\0') {
            // Formatted only when refused: this runs for every key of every event.
            return Err(format!(
                "{field}: a key is empty, longer than {MAX_TEXT} bytes or holds a NUL character"
            ));
        }
        value(v)?;
    }
    Ok(())
}

fn check_texts(field: &str, map: &HashMap<String, String>) -> Result<(), String> {
    check_map(field, map, |v| check_text(field, v, MAX_LONG_TEXT))
}

fn check_number(field: &str, value: f64) -> Result<(), String> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(format!("{field}: must be a finite number"))
    }
}

fn check_list(field: &str, len: usize, max: usize) -> Result<(), String> {
    if len > max {
        Err(format!("{field}: more than {max} elements"))
    } else {
        Ok(())
    }
}

/// The kind's required fields, enum values, lengths and numbers; the message names the field.
pub(super) fn validate(payload: &Payload) -> Result<(), String> {
    match payload {
        Payload::InstanceMetadata(m) => {
            let meta = m
                .metadata
                .as_ref()
                .ok_or_else(|| "instance_metadata.metadata: is required".to_owned())?;
            check_text(
                "instance_metadata.metadata.server_id",
                &meta.server_id,
                MAX_ID,
            )?;
            check_text(
                "instance_metadata.metadata.base_url",
                &meta.base_url,
                MAX_LONG_TEXT,
            )?;
            check_text(
                "instance_metadata.metadata.product",
                &meta.product,
                MAX_TEXT,
            )?;
            check_text(
                "instance_metadata.metadata.version",
                &meta.version,
                MAX_TEXT,
            )?;
            check_text(
                "instance_metadata.metadata.license_sen",
                &meta.license_sen,
                MAX_ID,
            )?;
            check_list(
                "instance_metadata.metadata.nodes",
                meta.nodes.len(),
                MAX_LIST,
            )?;
            for node in &meta.nodes {
                check_text(
                    "instance_metadata.metadata.nodes.node_id",
                    &node.node_id,
                    MAX_TEXT,
                )?;
                check_text(
                    "instance_metadata.metadata.nodes.java_version",
                    &node.java_version,
                    MAX_TEXT,
                )?;
                check_text(
                    "instance_metadata.metadata.nodes.state",
                    &node.state,
                    MAX_TEXT,
                )?;
            }
            check_map(
                "instance_metadata.metadata.feature_flags",
                &meta.feature_flags,
                |_| Ok(()),
            )?;
            check_list("instance_metadata.app_links", m.app_links.len(), MAX_LIST)?;
            for link in &m.app_links {
                check_text("instance_metadata.app_links.url", &link.url, MAX_LONG_TEXT)?;
                check_text(
                    "instance_metadata.app_links.product_family",
                    &link.product_family,
                    MAX_TEXT,
                )?;
                check_text(
                    "instance_metadata.app_links.server_id",
                    &link.server_id,
                    MAX_ID,
                )?;
                check_text(
                    "instance_metadata.app_links.version",
                    &link.version,
                    MAX_TEXT,
                )?;
            }
            check_texts("instance_metadata.attributes", &m.attributes)
        }
        Payload::Metric(metric) => {
            check_required("metric.name", &metric.name, MAX_TEXT)?;
            if common::MetricType::try_from(metric.r#type).is_err() {
                return Err("metric.type: is not a known metric type".into());
            }
            check_number("metric.value", metric.value)?;
            check_texts("metric.attributes", &metric.attributes)?;
            check_texts("metric.tags", &metric.tags)?;
            check_text("metric.unit", &metric.unit, MAX_TEXT)?;
            check_map("metric.values", &metric.values, |v| {
                check_number("metric.values", *v)
            })
        }
        Payload::FeatureUsage(f) => {
            check_required("feature_usage.feature", &f.feature, MAX_TEXT)?;
            for (field, value, max) in [
                ("feature_usage.username", &f.username, MAX_TEXT),
                ("feature_usage.project_id", &f.project_id, MAX_ID),
                ("feature_usage.project_key", &f.project_key, MAX_TEXT),
                ("feature_usage.project_name", &f.project_name, MAX_TEXT),
                ("feature_usage.app_key", &f.app_key, MAX_TEXT),
                ("feature_usage.app_name", &f.app_name, MAX_TEXT),
                ("feature_usage.user_id", &f.user_id, MAX_ID),
                ("feature_usage.custom_app_key", &f.custom_app_key, MAX_TEXT),
                (
                    "feature_usage.custom_app_name",
                    &f.custom_app_name,
                    MAX_TEXT,
                ),
            ] {
                check_text(field, value, max)?;
            }
            one_app_name(
                (
                    "feature_usage.app_key",
                    "custom_app_key and custom_app_name",
                ),
                ("feature_usage.custom_app_key", "custom_app"),
                f.custom_app,
                [&f.app_key, &f.app_name],
                [&f.custom_app_key, &f.custom_app_name],
            )?;
            check_texts("feature_usage.attributes", &f.attributes)
        }
        Payload::PageView(v) => {
            check_required("page_view.page_id", &v.page_id, MAX_ID)?;
            check_text("page_view.space_id", &v.space_id, MAX_ID)?;
            check_text("page_view.page_title", &v.page_title, MAX_TEXT)?;
            check_text("page_view.space_key", &v.space_key, MAX_TEXT)?;
            check_text("page_view.space_name", &v.space_name, MAX_TEXT)?;
            check_text("page_view.viewer_id", &v.viewer_id, MAX_ID)?;
            check_list("page_view.viewer_groups", v.viewer_groups.len(), MAX_LIST)?;
            for group in &v.viewer_groups {
                check_text("page_view.viewer_groups", group, MAX_TEXT)?;
            }
            match common::Channel::try_from(v.channel) {
                Ok(common::Channel::Unspecified) => {
                    return Err("page_view.channel: is required".into());
                }
                Err(_) => return Err("page_view.channel: is not a known channel".into()),
                Ok(_) => {}
            }
            check_text(
                "page_view.viewer_display_name",
                &v.viewer_display_name,
                MAX_TEXT,
            )?;
            check_text("page_view.viewer_email", &v.viewer_email, MAX_TEXT)?;
            check_text("page_view.client_ip", &v.client_ip, MAX_TEXT)?;
            check_text("page_view.page_url", &v.page_url, MAX_LONG_TEXT)
        }
        Payload::ClientMetric(c) => {
            check_required("client_metric.name", &c.name, MAX_TEXT)?;
            check_number("client_metric.p50_ms", c.p50_ms)?;
            check_number("client_metric.p95_ms", c.p95_ms)?;
            check_number("client_metric.error_rate", c.error_rate)?;
            if !(0.0..=1.0).contains(&c.error_rate) {
                return Err("client_metric.error_rate: must be between 0 and 1".into());
            }
            check_texts("client_metric.attributes", &c.attributes)
        }
        Payload::AppInventory(inventory) => {
            check_list("app_inventory.apps", inventory.apps.len(), MAX_APPS)?;
            for app in &inventory.apps {
                for (field, value) in [
                    ("app_inventory.apps.key", &app.key),
                    ("app_inventory.apps.name", &app.name),
                    ("app_inventory.apps.version", &app.version),
                    ("app_inventory.apps.custom_key", &app.custom_key),
                    ("app_inventory.apps.custom_name", &app.custom_name),
                ] {
                    check_text(field, value, MAX_TEXT)?;
                }
                one_app_name(
                    ("app_inventory.apps.key", "custom_key and custom_name"),
                    ("app_inventory.apps.custom_key", "custom"),
                    app.custom,
                    [&app.key, &app.name],
                    [&app.custom_key, &app.custom_name],
                )?;
            }
            Ok(())
        }
    }
}

/// An app is named one way: a custom app by its custom key and name, any other by its key and
/// name. `named` and `custom_named` are the fields to report and what the other side needs.
fn one_app_name(
    (named_field, custom_fields): (&str, &str),
    (custom_field, custom_flag): (&str, &str),
    custom: bool,
    named: [&String; 2],
    custom_named: [&String; 2],
) -> Result<(), String> {
    if custom && !named.iter().all(|v| v.is_empty()) {
        return Err(format!("{named_field}: a custom app fills {custom_fields}"));
    }
    if !custom && !custom_named.iter().all(|v| v.is_empty()) {
        return Err(format!(
            "{custom_field}: set {custom_flag} for a custom app"
        ));
    }
    Ok(())
}
