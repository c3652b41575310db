//! Org and instance ids (UUIDv7 text, see `common.proto`): parsed and normalised, or refused with
//! INVALID_ARGUMENT naming the field.

use tonic::Status;

/// The canonical form of the id in `value`, or INVALID_ARGUMENT naming `field`.
pub fn parse(field: &str, value: &str) -> Result<String, Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field}: is required")));
    }
    uuid::Uuid::parse_str(value)
        .map(|u| u.to_string())
        .map_err(|_| Status::invalid_argument(format!("{field}: is not a valid id")))
}

/// Like [`parse`], but an empty value is None.
pub fn optional(field: &str, value: &str) -> Result<Option<String>, Status> {
    if value.is_empty() {
        Ok(None)
    } else {
        parse(field, value).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_normalised_or_refused_by_field() {
        assert_eq!(
            parse("org_id", "0190A4D2-6C1E-7B3A-9F2D-1C2B3A4D5E6F").unwrap(),
            "0190a4d2-6c1e-7b3a-9f2d-1c2b3a4d5e6f"
        );
        let refused = parse("instance_id", "nope").unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().starts_with("instance_id"));
        assert_eq!(optional("x", "").unwrap(), None);
    }
}
