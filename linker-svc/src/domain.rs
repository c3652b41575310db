//! Validated inputs of linker-svc. Every check names the request field it is about, so a bad
//! request is answered INVALID_ARGUMENT with that field and nothing is written.

use crate::error::LinkerError;

pub const LINK_KEY_VALIDITY_MS: i64 = 30 * sightline_runtime::time::DAY_MS;
pub const MAX_PAGE_SIZE: u32 = 1_000;
pub const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_LABEL: usize = 200;
const MAX_APP_LINKS: usize = 100;
pub const MAX_LICENSES_PER_IMPORT: usize = 10_000;

fn invalid(field: &'static str, reason: impl Into<String>) -> LinkerError {
    LinkerError::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

/// An id Sightline issued (a UUID), checked for form only.
pub fn id(field: &'static str, value: &str) -> Result<String, LinkerError> {
    if value.is_empty() {
        return Err(invalid(field, "is required"));
    }
    uuid::Uuid::parse_str(value)
        .map(|u| u.to_string())
        .map_err(|_| invalid(field, "is not a valid id"))
}

pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn text(
    field: &'static str,
    value: &str,
    required: bool,
    max: usize,
) -> Result<String, LinkerError> {
    let value = value.trim();
    if required && value.is_empty() {
        return Err(invalid(field, "is required"));
    }
    if let Some(problem) = sightline_runtime::text::problem(value, max, false) {
        return Err(invalid(field, problem));
    }
    Ok(value.to_owned())
}

pub fn org_name(value: &str) -> Result<String, LinkerError> {
    text("name", value, true, MAX_LABEL)
}

pub fn label(value: &str) -> Result<String, LinkerError> {
    text("label", value, false, MAX_LABEL)
}

fn url(field: &'static str, value: &str) -> Result<String, LinkerError> {
    let value = text(field, value, true, 2_048)?;
    let rest = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"))
        .ok_or_else(|| invalid(field, "must be an http:// or https:// URL"))?;
    if rest.is_empty() || rest.starts_with('/') || rest.contains(char::is_whitespace) {
        return Err(invalid(field, "must name a host"));
    }
    Ok(value)
}

fn token_like(
    field: &'static str,
    value: &str,
    required: bool,
    max: usize,
) -> Result<String, LinkerError> {
    let value = text(field, value, required, max)?;
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        return Err(invalid(
            field,
            "may hold only letters, digits, '-', '_', '.' and ':'",
        ));
    }
    Ok(value)
}

/// Instance metadata as reported at link time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub server_id: String,
    pub base_url: String,
    pub product: String,
    pub version: String,
    pub license_sen: String,
    pub node_count: u32,
}

pub fn metadata(
    m: Option<&sightline_proto::common::v1::InstanceMetadata>,
) -> Result<Metadata, LinkerError> {
    let m = m.ok_or_else(|| invalid("metadata", "is required"))?;
    Ok(Metadata {
        server_id: token_like("metadata.server_id", &m.server_id, true, 128)?,
        base_url: url("metadata.base_url", &m.base_url)?,
        product: token_like("metadata.product", &m.product, false, 64)?,
        version: token_like("metadata.version", &m.version, false, 64)?,
        license_sen: token_like("metadata.license_sen", &m.license_sen, false, 64)?,
        node_count: m.node_count,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppLink {
    pub url: String,
    pub product_family: String,
    pub server_id: String,
    pub version: String,
}

pub fn app_links(
    links: &[sightline_proto::common::v1::AppLink],
) -> Result<Vec<AppLink>, LinkerError> {
    if links.len() > MAX_APP_LINKS {
        return Err(invalid(
            "app_links",
            format!("has more than {MAX_APP_LINKS} entries"),
        ));
    }
    let mut out: Vec<AppLink> = Vec::with_capacity(links.len());
    for link in links {
        let link = AppLink {
            url: url("app_links.url", &link.url)?,
            product_family: token_like(
                "app_links.product_family",
                &link.product_family,
                false,
                64,
            )?,
            server_id: token_like("app_links.server_id", &link.server_id, false, 128)?,
            version: token_like("app_links.version", &link.version, false, 64)?,
        };
        if out.iter().any(|l| l.url == link.url) {
            return Err(invalid("app_links.url", "appears twice"));
        }
        out.push(link);
    }
    Ok(out)
}

/// A domain name, lower-cased: labels of letters, digits and '-', at least two of them.
pub fn domain(value: &str) -> Result<String, LinkerError> {
    let value = value.trim().trim_end_matches('.').to_ascii_lowercase();
    if value.is_empty() {
        return Err(invalid("domain", "is required"));
    }
    let labels: Vec<&str> = value.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if value.len() > 253 || labels.len() < 2 || !labels.iter().all(label_ok) {
        return Err(invalid("domain", "is not a valid domain name"));
    }
    Ok(value)
}

pub fn license(
    l: &sightline_proto::linker::v1::LicenseRecord,
) -> Result<crate::store::LicenseRecord, LinkerError> {
    Ok(crate::store::LicenseRecord {
        sen: token_like("licenses.sen", &l.sen, true, 64)?,
        product: token_like("licenses.product", &l.product, false, 64)?,
        domain: domain(&l.domain)
            .map_err(|_| invalid("licenses.domain", "is not a valid domain name"))?,
    })
}

/// A page request: how many, and after which key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub size: i64,
    pub after: Option<String>,
}

/// A page: its size (0 means the default, more than the maximum is read as the maximum) and
/// where it starts.
pub fn page(page_size_requested: u32, page_token: &str) -> Result<Page, LinkerError> {
    let size =
        sightline_runtime::paging::page_size(page_size_requested, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE);
    let after = if page_token.is_empty() {
        None
    } else {
        Some(id("page_token", page_token)?)
    };
    Ok(Page { size, after })
}

/// The audit log pages by seq.
pub fn seq_page(page_size_requested: u32, page_token: &str) -> Result<(i64, i64), LinkerError> {
    let size =
        sightline_runtime::paging::page_size(page_size_requested, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE);
    let after = if page_token.is_empty() {
        0
    } else {
        page_token
            .parse::<i64>()
            .ok()
            .filter(|s| *s >= 0)
            .ok_or_else(|| invalid("page_token", "is not a valid page token"))?
    };
    Ok((size, after))
}

pub fn audit_action(field: &'static str, value: &str) -> Result<String, LinkerError> {
    let value = text(field, value, true, 100)?;
    if !value
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_'))
    {
        return Err(invalid(
            field,
            "must be dotted lower case, e.g. consent.updated",
        ));
    }
    Ok(value)
}

/// A ListEvents filter: empty, or the start of an action (dotted lower case, at most 100 characters).
pub fn action_prefix(value: &str) -> Result<&str, LinkerError> {
    if value.is_empty() {
        return Ok(value);
    }
    if value.len() > 100
        || !value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_'))
    {
        return Err(invalid(
            "action_prefix",
            "must be at most 100 characters of dotted lower case, e.g. consent.",
        ));
    }
    Ok(value)
}

pub fn audit_text(field: &'static str, value: &str, required: bool) -> Result<String, LinkerError> {
    text(field, value, required, 200)
}

/// An audit entry's optional idempotency key: 1 to 100 characters of [A-Za-z0-9._:-].
pub fn idempotency_key(value: &str) -> Result<Option<&str>, LinkerError> {
    if value.is_empty() {
        return Ok(None);
    }
    if value.len() > 100
        || !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
    {
        return Err(invalid(
            "idempotency_key",
            "must be 1 to 100 characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'",
        ));
    }
    Ok(Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(e: LinkerError) -> &'static str {
        match e {
            LinkerError::InvalidArgument { field, .. } => field,
            other => panic!("not invalid argument: {other:?}"),
        }
    }

    #[test]
    fn ids_must_be_uuids() {
        assert!(id("org_id", &new_id()).is_ok());
        assert_eq!(field_of(id("org_id", "").unwrap_err()), "org_id");
        assert_eq!(field_of(id("key_id", "nope").unwrap_err()), "key_id");
    }

    #[test]
    fn metadata_needs_server_id_and_an_http_base_url() {
        let mut m = sightline_proto::common::v1::InstanceMetadata {
            server_id: "B1C2-D3E4".into(),
            base_url: "https://jira.example.com".into(),
            ..Default::default()
        };
        assert!(metadata(Some(&m)).is_ok());
        m.base_url = "ftp://x".into();
        assert_eq!(
            field_of(metadata(Some(&m)).unwrap_err()),
            "metadata.base_url"
        );
        m.base_url = "https://x".into();
        m.server_id = String::new();
        assert_eq!(
            field_of(metadata(Some(&m)).unwrap_err()),
            "metadata.server_id"
        );
        assert_eq!(field_of(metadata(None).unwrap_err()), "metadata");
    }

    #[test]
    fn domains_are_normalised_and_checked() {
        assert_eq!(domain("Example.COM.").unwrap(), "example.com");
        assert!(domain("localhost").is_err());
        assert!(domain("bad_domain.com").is_err());
        assert!(domain("-x.com").is_err());
    }

    #[test]
    fn pages_are_bounded() {
        assert_eq!(page(0, "").unwrap().size, 100);
        assert_eq!(page(5_000, "").unwrap().size, 1_000);
        assert_eq!(field_of(page(10, "garbage").unwrap_err()), "page_token");
        assert_eq!(seq_page(10, "42").unwrap(), (10, 42));
        assert_eq!(field_of(seq_page(10, "-1").unwrap_err()), "page_token");
    }
}
