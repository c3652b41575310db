//! Day totals of page views (per instance, space and day), as both backends make and read them:
//! views, views per channel, the day's exact unique viewers and a sketch of them. A report adds the
//! days of its range; unique viewers over several days come from the merged sketches.

use std::collections::{BTreeMap, HashSet};

use super::ViewTotals;
use crate::sketch::{self, Sketch};

/// One day's totals of one scope (an instance, or a space of it).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct DayPart {
    pub(super) instance_id: String,
    pub(super) day: i64,
    pub(super) views: i64,
    /// (channel, views), by channel.
    pub(super) channels: Vec<(i64, i64)>,
    pub(super) unique_viewers: i64,
    pub(super) sketch: Sketch,
}

impl DayPart {
    /// A day's part from the page-view tables: (channel, views) cells and its viewers.
    pub(super) fn exact(
        instance_id: &str,
        day: i64,
        cells: &[(i64, i64)],
        viewers: &[String],
    ) -> Self {
        let mut channels: BTreeMap<i64, i64> = BTreeMap::new();
        for (channel, views) in cells {
            *channels.entry(*channel).or_default() += views;
        }
        let distinct: HashSet<&String> = viewers.iter().collect();
        let mut sketch = Sketch::default();
        for viewer in &distinct {
            sketch.add(sketch::viewer_hash(instance_id, viewer));
        }
        Self {
            instance_id: instance_id.to_owned(),
            day,
            views: channels.values().sum(),
            channels: channels.into_iter().collect(),
            unique_viewers: i64::try_from(distinct.len()).unwrap_or(i64::MAX),
            sketch,
        }
    }

    /// A stored day total: channels as "channel:views,…".
    pub(super) fn stored(
        instance_id: String,
        day: i64,
        views: i64,
        channels: &str,
        unique_viewers: i64,
        sketch: &[u8],
    ) -> Self {
        let channels = channels
            .split(',')
            .filter_map(|cell| {
                let (channel, views) = cell.split_once(':')?;
                Some((channel.parse().ok()?, views.parse().ok()?))
            })
            .collect();
        Self {
            instance_id,
            day,
            views,
            channels,
            unique_viewers,
            sketch: Sketch::from_bytes(sketch).unwrap_or_default(),
        }
    }

    pub(super) fn channels_text(&self) -> String {
        self.channels
            .iter()
            .map(|(channel, views)| format!("{channel}:{views}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A day's totals of one instance: per space (`(space_id, part)`) and for the whole instance
/// (space ""), from its (space, channel, views) cells and (space, viewer) entries.
pub(super) fn day_parts(
    instance_id: &str,
    day: i64,
    cells: &[(String, i64, i64)],
    viewers: &[(String, String)],
) -> Vec<(String, DayPart)> {
    // Per space: its (channel, views) cells and its viewers.
    type Space = (Vec<(i64, i64)>, Vec<String>);
    let mut spaces: BTreeMap<&str, Space> = BTreeMap::new();
    for (space, channel, views) in cells {
        spaces
            .entry(space.as_str())
            .or_default()
            .0
            .push((*channel, *views));
    }
    for (space, viewer) in viewers {
        spaces
            .entry(space.as_str())
            .or_default()
            .1
            .push(viewer.clone());
    }
    let all_cells: Vec<(i64, i64)> = cells.iter().map(|(_, c, v)| (*c, *v)).collect();
    let all_viewers: Vec<String> = viewers.iter().map(|(_, v)| v.clone()).collect();
    let mut parts = vec![(
        String::new(),
        DayPart::exact(instance_id, day, &all_cells, &all_viewers),
    )];
    for (space, (cells, viewers)) in spaces {
        if !space.is_empty() {
            parts.push((
                space.to_owned(),
                DayPart::exact(instance_id, day, &cells, &viewers),
            ));
        }
    }
    parts
}

/// A report's totals from the day parts of its range. Unique viewers: exact when the range holds
/// one day (instances tell viewers apart, so their counts add up); over several days, the merged
/// sketches' estimate, kept between the largest day and the sum of days.
pub(super) fn combine(parts: &[DayPart]) -> ViewTotals {
    let mut totals = ViewTotals::default();
    let mut channels: BTreeMap<i64, i64> = BTreeMap::new();
    let mut days: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    let mut merged = Sketch::default();
    for part in parts {
        totals.views += part.views;
        for (channel, views) in &part.channels {
            *channels.entry(*channel).or_default() += views;
        }
        let day = days.entry(part.day).or_default();
        day.0 += part.views;
        day.1 += part.unique_viewers;
        merged.merge(&part.sketch);
    }
    totals.by_channel = channels.into_iter().collect();
    totals.by_day = days.iter().map(|(d, (v, u))| (*d, *v, *u)).collect();
    let most = days.values().map(|(_, u)| *u).max().unwrap_or(0);
    let sum: i64 = days.values().map(|(_, u)| *u).sum();
    if days.len() <= 1 {
        totals.unique_viewers = sum;
    } else {
        #[allow(clippy::cast_possible_truncation)]
        let estimate = merged.estimate().round() as i64;
        totals.unique_viewers = estimate.clamp(most, sum);
        totals.unique_error = sketch::ERROR;
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_day_is_exact_and_several_are_estimated_within_bounds() {
        let viewers = |from: u32, to: u32| -> Vec<(String, String)> {
            (from..to)
                .map(|n| ("s1".to_owned(), format!("v{n}")))
                .collect()
        };
        let cells = vec![("s1".to_owned(), 1, 10), ("s1".to_owned(), 2, 5)];
        let d1 = day_parts("i", 1, &cells, &viewers(0, 300));
        let d2 = day_parts("i", 2, &cells, &viewers(200, 500));
        assert_eq!(d1.len(), 2, "the instance and its one space");
        assert_eq!(d1[0].1.unique_viewers, 300);
        assert_eq!(d1[0].1.channels, vec![(1, 10), (2, 5)]);
        let one = combine(&[d1[0].1.clone()]);
        assert_eq!(
            (one.views, one.unique_viewers, one.unique_error),
            (15, 300, 0.0)
        );
        let two = combine(&[d1[0].1.clone(), d2[0].1.clone()]);
        assert_eq!(two.views, 30);
        assert_eq!(two.by_day, vec![(1, 15, 300), (2, 15, 300)]);
        assert!(
            (two.unique_viewers - 500).abs() <= 15,
            "{}",
            two.unique_viewers
        );
        assert!(two.unique_error > 0.0);
        let stored = DayPart::stored(
            "i".into(),
            1,
            15,
            &d1[0].1.channels_text(),
            300,
            &d1[0].1.sketch.to_bytes(),
        );
        assert_eq!(stored, d1[0].1);
    }
}
