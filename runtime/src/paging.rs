//! Page sizes, one behaviour in every service (as AIP-158 asks): 0 asks for the method's default,
//! and a size over the method's maximum is read as the maximum, never refused. Each method's
//! contract comment states its default and maximum.

/// The page size to read for a `requested` size.
pub fn page_size(requested: u32, default: u32, max: u32) -> i64 {
    i64::from(match requested {
        0 => default.min(max),
        n => n.min(max),
    })
}

#[cfg(test)]
mod tests {
    use super::page_size;

    #[test]
    fn zero_asks_for_the_default_and_an_oversized_page_is_read_as_the_maximum() {
        assert_eq!(page_size(0, 100, 1_000), 100);
        assert_eq!(page_size(7, 100, 1_000), 7);
        assert_eq!(page_size(1_000, 100, 1_000), 1_000);
        assert_eq!(page_size(5_000, 100, 1_000), 1_000);
        assert_eq!(page_size(u32::MAX, 100, 1_000), 1_000);
    }
}
