//! Tests of `grpc`.

use super::*;

#[test]
fn days_print_as_dates() {
    assert_eq!(day_text(0), "1970-01-01");
    assert_eq!(day_text(19_723), "2024-01-01");
    assert_eq!(day_text(20_514), "2026-03-02");
}

#[test]
fn page_tokens_round_trip_and_refuse_garbage() {
    assert_eq!(offset_token(&next_offset_token(0, 50, 50)).unwrap(), 50);
    assert_eq!(next_offset_token(0, 10, 50), "");
    assert!(offset_token("zz").is_err());
    assert_eq!(
        cursor_token(&cursor(5, "e-1")).unwrap(),
        Some((5, "e-1".to_owned()))
    );
    assert!(cursor_token(&hex::encode("c:x|y")).is_err());
}
