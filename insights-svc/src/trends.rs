//! Trends (SPEC I2): a metric's hourly rollups grouped into buckets, a least-squares line through
//! the buckets' means, and a direction that is honest about noise.
//!
//! A line is called RISING or FALLING only when both hold:
//! - the slope is significant: |slope| ≥ 3 × its standard error (the residuals' scatter around the
//!   line), so a flat line with noise on it stays FLAT however noisy it is;
//! - the change it makes over the range is material: ≥ 2 % of the series' mean magnitude, so a
//!   tiny but steady drift is FLAT too.
//!
//! Fewer than three buckets with data are FLAT (no line can be judged).

use sightline_proto::insights::v1::TrendDirection;

use crate::health::Hour;

pub use sightline_runtime::time::DAY_MS;
/// How many standard errors a slope must be to count.
pub const SIGNIFICANCE: f64 = 3.0;
/// The smallest change over the range, as a share of the mean, that counts.
pub const MATERIAL_SHARE: f64 = 0.02;

/// A bucket's mean and how many samples made it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub at_ms: i64,
    pub value: f64,
    pub samples: u64,
}

/// The buckets of `[from, to)`, each `bucket_ms` wide from `from`, that have samples.
pub fn bucket(hours: &[Hour], from: i64, to: i64, bucket_ms: i64) -> Vec<Point> {
    let mut sums: std::collections::BTreeMap<i64, (f64, u64)> = std::collections::BTreeMap::new();
    for hour in hours {
        if hour.hour_ms < from || hour.hour_ms >= to || hour.count == 0 {
            continue;
        }
        let start = from + (hour.hour_ms - from).div_euclid(bucket_ms) * bucket_ms;
        let slot = sums.entry(start).or_insert((0.0, 0));
        slot.0 += hour.sum;
        slot.1 += hour.count;
    }
    sums.into_iter()
        .map(|(at_ms, (sum, samples))| Point {
            at_ms,
            value: sum / samples as f64,
            samples,
        })
        .collect()
}

/// The line through `points`: slope per day and direction.
pub fn fit(points: &[Point]) -> (f64, TrendDirection) {
    if points.len() < 3 {
        return (0.0, TrendDirection::Flat);
    }
    let n = points.len() as f64;
    let x0 = points[0].at_ms;
    let xs: Vec<f64> = points
        .iter()
        .map(|p| (p.at_ms - x0) as f64 / DAY_MS as f64)
        .collect();
    let mean_x = xs.iter().sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.value).sum::<f64>() / n;
    let sxx: f64 = xs.iter().map(|x| (x - mean_x).powi(2)).sum();
    if sxx <= 0.0 {
        return (0.0, TrendDirection::Flat);
    }
    let sxy: f64 = xs
        .iter()
        .zip(points)
        .map(|(x, p)| (x - mean_x) * (p.value - mean_y))
        .sum();
    let slope = sxy / sxx;
    let intercept = mean_y - slope * mean_x;
    let residuals: f64 = xs
        .iter()
        .zip(points)
        .map(|(x, p)| (p.value - (intercept + slope * x)).powi(2))
        .sum();
    let standard_error = (residuals / (n - 2.0)).sqrt() / sxx.sqrt();
    let span = xs.last().copied().unwrap_or(0.0) - xs[0];
    let change = slope * span;
    let scale = points.iter().map(|p| p.value.abs()).sum::<f64>() / n;
    let significant = slope.abs() >= SIGNIFICANCE * standard_error && slope != 0.0;
    let material = change.abs() >= MATERIAL_SHARE * scale.max(f64::MIN_POSITIVE);
    let direction = if !(significant && material) {
        TrendDirection::Flat
    } else if slope > 0.0 {
        TrendDirection::Rising
    } else {
        TrendDirection::Falling
    };
    (slope, direction)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::HOUR_MS;

    /// 30 days of hourly rollups of `f(hour index)`, with a fixed pseudo-random noise.
    fn series(f: impl Fn(f64) -> f64, noise: f64) -> Vec<Hour> {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        (0..30 * 24)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let jitter = ((state % 10_000) as f64 / 10_000.0 - 0.5) * 2.0 * noise;
                let value = f(i as f64) + jitter;
                Hour::steady(i * HOUR_MS, value)
            })
            .collect()
    }

    fn direction(hours: &[Hour]) -> (f64, TrendDirection) {
        fit(&bucket(hours, 0, 30 * DAY_MS, DAY_MS))
    }

    #[test]
    fn a_rising_line_is_rising() {
        // 40 → 76 % over 30 days, with ±10 points of noise every hour.
        let (slope, dir) = direction(&series(|h| 40.0 + h * 0.05, 10.0));
        assert_eq!(dir, TrendDirection::Rising);
        assert!((slope - 1.2).abs() < 0.1, "slope {slope}");
    }

    #[test]
    fn a_falling_line_is_falling() {
        let (slope, dir) = direction(&series(|h| 900.0 - h * 0.5, 50.0));
        assert_eq!(dir, TrendDirection::Falling);
        assert!((slope + 12.0).abs() < 1.0, "slope {slope}");
    }

    #[test]
    fn a_flat_noisy_line_is_flat() {
        for noise in [1.0, 20.0, 45.0] {
            let (_, dir) = direction(&series(|_| 50.0, noise));
            assert_eq!(dir, TrendDirection::Flat, "noise ±{noise}");
        }
        // Hourly buckets: 720 points of pure noise.
        let (_, dir) = fit(&bucket(&series(|_| 50.0, 45.0), 0, 30 * DAY_MS, HOUR_MS));
        assert_eq!(dir, TrendDirection::Flat);
    }

    #[test]
    fn a_steady_but_tiny_drift_is_flat() {
        // 1000 → 1001 over 30 days, no noise: significant but not material.
        let (slope, dir) = direction(&series(|h| 1000.0 + h / 720.0, 0.0));
        assert!(slope > 0.0);
        assert_eq!(dir, TrendDirection::Flat);
    }

    #[test]
    fn too_few_buckets_are_flat() {
        let hours = series(|h| h, 0.0);
        assert_eq!(
            fit(&bucket(&hours, 0, 2 * DAY_MS, DAY_MS)).1,
            TrendDirection::Flat
        );
    }

    #[test]
    fn buckets_hold_the_mean_of_their_samples() {
        let hours = series(|h| if h < 24.0 { 10.0 } else { 20.0 }, 0.0);
        let points = bucket(&hours, 0, 3 * DAY_MS, DAY_MS);
        assert_eq!(points.len(), 3);
        assert_eq!(points[0].value, 10.0);
        assert_eq!(points[1].value, 20.0);
        assert_eq!(points[0].samples, 24 * 30);
        assert_eq!(points[1].at_ms, DAY_MS);
    }
}
