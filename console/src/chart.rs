//! Line and bar charts drawn as SVG on the server: no script, no style attributes (the CSP allows
//! neither inline), every value also in a table beside the chart. Labels are escaped.

use std::fmt::Write;

use crate::format::number;

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Point {
    pub label: String,
    pub value: f64,
}

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 220.0;
const LEFT: f64 = 84.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 28.0;

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The y range drawn: from 0 (or the lowest value when it is negative) to the highest, never empty.
fn y_range(points: &[Point]) -> (f64, f64) {
    let values = points.iter().map(|p| p.value).filter(|v| v.is_finite());
    let (lo, hi) = values.fold((0.0_f64, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if hi <= lo { (lo, lo + 1.0) } else { (lo, hi) }
}

/// The frame: axes, the top and bottom values and the first and last labels.
fn frame(out: &mut String, title: &str, unit: &str, points: &[Point], lo: f64, hi: f64) {
    let _ = write!(
        out,
        r#"<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{}" xmlns="http://www.w3.org/2000/svg"><title>{}</title>"#,
        escape(title),
        escape(title)
    );
    let (x0, y0, x1, y1) = (LEFT, HEIGHT - BOTTOM, WIDTH - RIGHT, TOP);
    let _ = write!(
        out,
        r#"<path class="axis" d="M{x0} {y1} V{y0} H{x1}" fill="none"/><text class="tick" x="{}" y="{}" text-anchor="end">{}</text><text class="tick" x="{}" y="{}" text-anchor="end">{}</text>"#,
        x0 - 6.0,
        y1 + 10.0,
        escape(&format!("{} {unit}", number(hi, 2))),
        x0 - 6.0,
        y0,
        escape(&format!("{} {unit}", number(lo, 2))),
    );
    if let (Some(first), Some(last)) = (points.first(), points.last()) {
        let _ = write!(
            out,
            r#"<text class="tick" x="{x0}" y="{}" text-anchor="start">{}</text><text class="tick" x="{x1}" y="{}" text-anchor="end">{}</text>"#,
            HEIGHT - 8.0,
            escape(&first.label),
            HEIGHT - 8.0,
            escape(&last.label),
        );
    }
}

fn scale(value: f64, lo: f64, hi: f64) -> f64 {
    let plot = HEIGHT - BOTTOM - TOP;
    HEIGHT - BOTTOM - (value - lo) / (hi - lo) * plot
}

/// A line through `points`, evenly spaced, with a marker (and its value as a tooltip) at each.
pub(crate) fn line(title: &str, unit: &str, points: &[Point]) -> String {
    let mut out = String::new();
    let (lo, hi) = y_range(points);
    frame(&mut out, title, unit, points, lo, hi);
    let plot_w = WIDTH - LEFT - RIGHT;
    #[allow(clippy::cast_precision_loss)]
    let step = plot_w / (points.len().max(2) - 1) as f64;
    let coords: Vec<(f64, f64, &Point)> = points
        .iter()
        .enumerate()
        .filter(|(_, p)| p.value.is_finite())
        .map(|(i, p)| {
            #[allow(clippy::cast_precision_loss)]
            let x = LEFT + step * i as f64;
            (x, scale(p.value, lo, hi), p)
        })
        .collect();
    let path: Vec<String> = coords
        .iter()
        .map(|(x, y, _)| format!("{x:.1},{y:.1}"))
        .collect();
    let _ = write!(
        out,
        r#"<polyline class="series" fill="none" points="{}"/>"#,
        path.join(" ")
    );
    for (x, y, p) in &coords {
        let _ = write!(
            out,
            r#"<circle class="marker" cx="{x:.1}" cy="{y:.1}" r="3"><title>{}: {} {}</title></circle>"#,
            escape(&p.label),
            number(p.value, 2),
            escape(unit)
        );
    }
    out.push_str("</svg>");
    out
}

/// One bar per point.
pub(crate) fn bars(title: &str, unit: &str, points: &[Point]) -> String {
    let mut out = String::new();
    let (lo, hi) = y_range(points);
    frame(&mut out, title, unit, points, lo, hi);
    let plot_w = WIDTH - LEFT - RIGHT;
    #[allow(clippy::cast_precision_loss)]
    let slot = plot_w / points.len().max(1) as f64;
    let base = scale(lo.max(0.0), lo, hi);
    for (i, p) in points
        .iter()
        .enumerate()
        .filter(|(_, p)| p.value.is_finite())
    {
        #[allow(clippy::cast_precision_loss)]
        let x = LEFT + slot * i as f64 + slot * 0.15;
        let y = scale(p.value, lo, hi);
        let _ = write!(
            out,
            r#"<rect class="bar" x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}"><title>{}: {} {}</title></rect>"#,
            y.min(base),
            slot * 0.7,
            (base - y).abs(),
            escape(&p.label),
            number(p.value, 2),
            escape(unit)
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(values: &[f64]) -> Vec<Point> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| Point {
                label: format!("<d{i}>"),
                value: *v,
            })
            .collect()
    }

    #[test]
    fn a_line_has_one_marker_per_value_and_escapes_labels() {
        let svg = line("p95 <script>", "ms", &points(&[1.0, 5.0, 3.0]));
        assert_eq!(svg.matches("<circle").count(), 3);
        assert!(!svg.contains("<script>") && !svg.contains("<d0>"));
        assert!(svg.contains("&lt;script&gt;") && svg.contains("&lt;d2&gt;: 3 ms"));
        assert!(!svg.contains("style="), "the CSP forbids inline style");
        // The highest value touches the top of the plot, the lowest axis value is 0.
        assert!(svg.contains(&format!(r#"cy="{TOP:.1}""#)));
    }

    #[test]
    fn empty_flat_and_non_finite_series_draw_without_panicking() {
        for values in [&[][..], &[0.0], &[2.0, 2.0], &[f64::NAN, 1.0], &[-3.0, 4.0]] {
            let svg = line("t", "", &points(values));
            assert!(svg.ends_with("</svg>"));
            assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
            let svg = bars("t", "", &points(values));
            assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        }
    }
}
