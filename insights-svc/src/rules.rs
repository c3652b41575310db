//! Health rules are data (SPEC I1): a versioned TOML file, with built-in defaults
//! (`rules/default.toml`, compiled in). A file given in settings extends or replaces them and is
//! checked at start: a bad file stops the service with the rule and the field named.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use sightline_proto::insights::v1::Severity;

/// The built-in rules.
pub const DEFAULT_RULES: &str = include_str!("../rules/default.toml");

/// Longest window a rule reads (30 days of hourly rollups).
pub const MAX_WINDOW_HOURS: u32 = 720;

/// How a rule reduces a window of hourly rollups to one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregation {
    /// The largest hourly maximum.
    Max,
    /// The 95th percentile (nearest rank) of the hourly p95 values.
    P95,
    /// All values' sum over their number.
    Avg,
    /// The latest hour's mean.
    Last,
}

impl Aggregation {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "max" => Self::Max,
            "p95" => Self::P95,
            "avg" => Self::Avg,
            "last" => Self::Last,
            _ => return None,
        })
    }

    /// How the evidence describes it.
    pub fn describe(self, window_hours: u32) -> String {
        match self {
            Self::Max => format!("max of hourly max over {window_hours} h"),
            Self::P95 => format!("p95 of hourly p95 over {window_hours} h"),
            Self::Avg => format!("mean over {window_hours} h"),
            Self::Last => format!("mean of the latest hour within {window_hours} h"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Above,
    AtLeast,
    Below,
    AtMost,
}

impl Comparison {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            ">" => Self::Above,
            ">=" => Self::AtLeast,
            "<" => Self::Below,
            "<=" => Self::AtMost,
            _ => return None,
        })
    }

    pub fn symbol(self) -> &'static str {
        match self {
            Self::Above => ">",
            Self::AtLeast => ">=",
            Self::Below => "<",
            Self::AtMost => "<=",
        }
    }

    /// Whether `observed` breaks the rule.
    pub fn fires(self, observed: f64, threshold: f64) -> bool {
        match self {
            Self::Above => observed > threshold,
            Self::AtLeast => observed >= threshold,
            Self::Below => observed < threshold,
            Self::AtMost => observed <= threshold,
        }
    }
}

/// One checked rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub id: String,
    pub title: String,
    pub severity: Severity,
    pub weight: u32,
    pub metric: String,
    pub aggregation: Aggregation,
    pub window_hours: u32,
    pub comparison: Comparison,
    pub threshold: f64,
    pub unit: String,
    pub recommendation: String,
}

impl Rule {
    pub fn window(&self) -> Duration {
        Duration::from_secs(u64::from(self.window_hours) * 3_600)
    }
}

/// The rules in force and their version.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub version: String,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    #[error("rules file {file}: {reason}")]
    File { file: String, reason: String },
    #[error("rules file {file}: rule {rule}: {field}: {reason}")]
    Field {
        file: String,
        rule: String,
        field: String,
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileForm {
    version: String,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    rule: Vec<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleForm {
    id: String,
    title: String,
    severity: String,
    weight: u32,
    metric: String,
    aggregation: String,
    window_hours: u32,
    comparison: String,
    threshold: f64,
    unit: String,
    recommendation: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Extend,
    Replace,
}

impl Rules {
    /// The built-in rules.
    pub fn defaults() -> Result<Self, RulesError> {
        let (rules, _) = parse("(built-in)", DEFAULT_RULES)?;
        Ok(rules)
    }

    /// The built-in rules, extended or replaced by the file at `path` when given.
    pub fn load(path: Option<&Path>) -> Result<Self, RulesError> {
        let defaults = Self::defaults()?;
        let Some(path) = path else {
            return Ok(defaults);
        };
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| RulesError::File {
            file: file.clone(),
            reason: e.to_string(),
        })?;
        let (given, mode) = parse(&file, &text)?;
        Ok(match mode {
            Mode::Replace => given,
            Mode::Extend => {
                let mut rules: Vec<Rule> = defaults
                    .rules
                    .into_iter()
                    .filter(|d| !given.rules.iter().any(|g| g.id == d.id))
                    .collect();
                rules.extend(given.rules);
                Rules {
                    version: format!("{}+{}", defaults.version, given.version),
                    rules,
                }
            }
        })
    }

    /// The metrics the rules read, each with the longest window any rule reads it over.
    pub fn metrics(&self) -> Vec<(String, u32)> {
        let mut out: Vec<(String, u32)> = Vec::new();
        for rule in &self.rules {
            match out.iter_mut().find(|(m, _)| *m == rule.metric) {
                Some((_, hours)) => *hours = (*hours).max(rule.window_hours),
                None => out.push((rule.metric.clone(), rule.window_hours)),
            }
        }
        out
    }
}

fn parse(file: &str, text: &str) -> Result<(Rules, Mode), RulesError> {
    let form: FileForm = toml::from_str(text).map_err(|e| RulesError::File {
        file: file.to_owned(),
        reason: e.message().to_owned(),
    })?;
    let file_error = |reason: String| RulesError::File {
        file: file.to_owned(),
        reason,
    };
    if form.version.trim().is_empty() {
        return Err(file_error("version: must name the rules' version".into()));
    }
    let mode = match form.mode.as_deref() {
        None | Some("extend") => Mode::Extend,
        Some("replace") => Mode::Replace,
        Some(other) => {
            return Err(file_error(format!(
                "mode: {other:?} is neither \"extend\" nor \"replace\""
            )));
        }
    };
    let mut seen = HashSet::new();
    let mut rules = Vec::with_capacity(form.rule.len());
    for (index, value) in form.rule.into_iter().enumerate() {
        let name = value
            .get("id")
            .and_then(toml::Value::as_str)
            .map_or_else(|| format!("#{}", index + 1), |id| format!("{id:?}"));
        let field = |field: &str, reason: String| RulesError::Field {
            file: file.to_owned(),
            rule: name.clone(),
            field: field.to_owned(),
            reason,
        };
        let form: RuleForm = serde_path_to_error::deserialize(value).map_err(|e| {
            let message = e.inner().message().to_owned();
            let path = e.path().to_string();
            // A missing or unknown field is named in serde's message ("missing field `x`").
            let named = if path.is_empty() || path == "." {
                message.split('`').nth(1).unwrap_or("(rule)").to_owned()
            } else {
                path
            };
            field(&named, message)
        })?;
        rules.push(check(form, &field, &mut seen)?);
    }
    if rules.is_empty() && mode == Mode::Replace {
        return Err(file_error(
            "mode = \"replace\" with no [[rule]]: every instance would score 100".into(),
        ));
    }
    Ok((
        Rules {
            version: form.version.trim().to_owned(),
            rules,
        },
        mode,
    ))
}

fn check(
    form: RuleForm,
    field: &dyn Fn(&str, String) -> RulesError,
    seen: &mut HashSet<String>,
) -> Result<Rule, RulesError> {
    let id_ok = !form.id.is_empty()
        && form.id.len() <= 64
        && form
            .id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !id_ok {
        return Err(field(
            "id",
            "must be 1 to 64 of lower-case letters, digits, '-' and '.'".into(),
        ));
    }
    if !seen.insert(form.id.clone()) {
        return Err(field("id", "is used by an earlier rule of the file".into()));
    }
    let text = |name: &str, value: &str, max: usize| -> Result<String, RulesError> {
        let value = value.trim();
        if value.is_empty() || value.chars().count() > max {
            return Err(field(name, format!("must be 1 to {max} characters")));
        }
        Ok(value.to_owned())
    };
    let severity = match form.severity.as_str() {
        "info" => Severity::Info,
        "low" => Severity::Low,
        "medium" => Severity::Medium,
        "high" => Severity::High,
        "critical" => Severity::Critical,
        other => {
            return Err(field(
                "severity",
                format!("{other:?} is not one of info, low, medium, high, critical"),
            ));
        }
    };
    if form.weight > 100 {
        return Err(field("weight", "must be 0 to 100".into()));
    }
    let aggregation = Aggregation::parse(&form.aggregation).ok_or_else(|| {
        field(
            "aggregation",
            format!("{:?} is not one of max, p95, avg, last", form.aggregation),
        )
    })?;
    if form.window_hours == 0 || form.window_hours > MAX_WINDOW_HOURS {
        return Err(field(
            "window_hours",
            format!("must be 1 to {MAX_WINDOW_HOURS}"),
        ));
    }
    let comparison = Comparison::parse(&form.comparison).ok_or_else(|| {
        field(
            "comparison",
            format!("{:?} is not one of >, >=, <, <=", form.comparison),
        )
    })?;
    if !form.threshold.is_finite() {
        return Err(field("threshold", "must be a finite number".into()));
    }
    Ok(Rule {
        title: text("title", &form.title, 200)?,
        metric: text("metric", &form.metric, 128)?,
        unit: text("unit", &form.unit, 32)?,
        recommendation: text("recommendation", &form.recommendation, 2_000)?,
        id: form.id,
        severity,
        weight: form.weight,
        aggregation,
        window_hours: form.window_hours,
        comparison,
        threshold: form.threshold,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    const ONE: &str = r#"
version = "acme-3"
[[rule]]
id = "queue-size"
title = "The mail queue is long"
severity = "medium"
weight = 7
metric = "mail.queue.size"
aggregation = "max"
window_hours = 6
comparison = ">="
threshold = 500
unit = "count"
recommendation = "Check the mail server."
"#;

    #[test]
    fn the_defaults_cover_every_required_area_and_weigh_100() {
        let rules = Rules::defaults().unwrap();
        let metrics: Vec<&str> = rules.rules.iter().map(|r| r.metric.as_str()).collect();
        for wanted in [
            "jvm.cpu.load",
            "jvm.heap.used_percent",
            "jvm.gc.time_share",
            "db.connection.latency",
            "http.request.latency",
            "index.size",
            "guardrail.projects",
            "guardrail.issues",
            "guardrail.custom_fields",
            "guardrail.users",
            "guardrail.groups",
            "guardrail.spaces",
            "guardrail.apps",
        ] {
            assert!(metrics.contains(&wanted), "no default rule reads {wanted}");
        }
        assert_eq!(rules.rules.iter().map(|r| r.weight).sum::<u32>(), 100);
    }

    #[test]
    fn a_file_extends_the_defaults_and_replaces_rules_by_id() {
        let replaced = ONE.replace("queue-size", "cpu-load-high");
        let file = write(&format!(
            "{ONE}\n{}",
            &replaced[replaced.find("[[rule]]").unwrap()..]
        ));
        let rules = Rules::load(Some(file.path())).unwrap();
        assert_eq!(rules.version, "2026.11.1+acme-3");
        let defaults = Rules::defaults().unwrap();
        assert_eq!(rules.rules.len(), defaults.rules.len() + 1);
        let cpu = rules
            .rules
            .iter()
            .find(|r| r.id == "cpu-load-high")
            .unwrap();
        assert_eq!(cpu.metric, "mail.queue.size");
        assert_eq!(cpu.comparison, Comparison::AtLeast);
    }

    #[test]
    fn a_file_in_replace_mode_is_all_there_is() {
        let file = write(&ONE.replace(
            "version = \"acme-3\"",
            "version = \"acme-3\"\nmode = \"replace\"",
        ));
        let rules = Rules::load(Some(file.path())).unwrap();
        assert_eq!(rules.version, "acme-3");
        assert_eq!(rules.rules.len(), 1);
    }

    #[test]
    fn a_bad_file_names_the_rule_and_the_field() {
        let cases = [
            (
                ONE.replace("\"medium\"", "\"urgent\""),
                "rule \"queue-size\": severity",
            ),
            (
                ONE.replace("weight = 7", "weight = 700"),
                "rule \"queue-size\": weight",
            ),
            (
                ONE.replace("\"max\"", "\"median\""),
                "rule \"queue-size\": aggregation",
            ),
            (
                ONE.replace("window_hours = 6", "window_hours = 0"),
                "rule \"queue-size\": window_hours",
            ),
            (
                ONE.replace("\">=\"", "\"=>\""),
                "rule \"queue-size\": comparison",
            ),
            (
                ONE.replace("threshold = 500\n", ""),
                "rule \"queue-size\": threshold",
            ),
            (
                ONE.replace("threshold = 500", "threshold = \"lots\""),
                "rule \"queue-size\": threshold",
            ),
            (
                ONE.replace("unit = \"count\"", "unit = \"count\"\ncolour = \"red\""),
                "rule \"queue-size\": colour",
            ),
            (
                ONE.replace("\"queue-size\"", "\"Queue Size\""),
                "rule \"Queue Size\": id",
            ),
            (
                ONE.replace("title = \"The mail queue is long\"", "title = \"  \""),
                "rule \"queue-size\": title",
            ),
            (
                format!("{ONE}{}", &ONE[ONE.find("[[rule]]").unwrap()..]),
                "rule \"queue-size\": id",
            ),
            (
                ONE.replace(
                    "version = \"acme-3\"",
                    "version = \"acme-3\"\nmode = \"merge\"",
                ),
                ": mode",
            ),
            (ONE.replace("version = \"acme-3\"", ""), "version"),
            ("[[rule]\n".to_owned(), "rules file"),
        ];
        for (text, named) in cases {
            let file = write(&text);
            let error = Rules::load(Some(file.path())).unwrap_err().to_string();
            assert!(error.contains(named), "{error:?} does not name {named:?}");
        }
    }

    #[test]
    fn comparisons_fire_as_written() {
        assert!(Comparison::Above.fires(2.0, 1.0));
        assert!(!Comparison::Above.fires(1.0, 1.0));
        assert!(Comparison::AtLeast.fires(1.0, 1.0));
        assert!(Comparison::Below.fires(0.5, 1.0));
        assert!(Comparison::AtMost.fires(1.0, 1.0));
        assert!(!Comparison::AtMost.fires(1.5, 1.0));
    }
}
