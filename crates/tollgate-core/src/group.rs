//! Groups and the per-slug model access they declare.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::limits::{LimitMode, LimitUnit, RateLimit, UsageLimit, MAX_THRESHOLD};
use crate::slug::validate_slug;

/// Deepest allowed tree: a root is level 1.
pub const MAX_DEPTH: u32 = 5;

/// One slug a group may call, with the limits it declares on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelAccess {
    pub slug: String,
    #[serde(default)]
    pub rate_limits: Vec<RateLimit>,
    #[serde(default)]
    pub usage_limits: Vec<UsageLimit>,
}

/// A group as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub id: String,
    pub workspace_id: String,
    pub name: Option<String>,
    pub external_entity_id: String,
    pub models: Vec<ModelAccess>,
    pub mode: LimitMode,
    pub parent_id: Option<String>,
    /// 1 for a root.
    pub depth: u32,
    pub created_at: Timestamp,
}

impl Group {
    pub fn model(&self, slug: &str) -> Option<&ModelAccess> {
        self.models.iter().find(|m| m.slug == slug)
    }
}

/// A rule broken by a model list; `field` is the JSON path of the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidModels {
    pub field: String,
    pub reason: String,
}

fn invalid(field: String, reason: impl Into<String>) -> InvalidModels {
    InvalidModels {
        field,
        reason: reason.into(),
    }
}

/// Checks a `models` list on its own: slug shapes, unique slugs, units allowed in each
/// list, at most one limit per (type, unit) per list, thresholds in range.
/// `field` is the path prefix used in messages (`models`).
pub fn validate_models(models: &[ModelAccess], field: &str) -> Result<(), InvalidModels> {
    let mut slugs = HashSet::new();
    for (i, model) in models.iter().enumerate() {
        let at = format!("{field}[{i}]");
        validate_slug(&model.slug).map_err(|why| invalid(format!("{at}.slug"), why))?;
        if !slugs.insert(model.slug.as_str()) {
            return Err(invalid(
                format!("{at}.slug"),
                format!("duplicate slug '{}'", model.slug),
            ));
        }
        let mut seen = HashSet::new();
        for (j, limit) in model.rate_limits.iter().enumerate() {
            let here = format!("{at}.rate_limits[{j}]");
            if limit.unit == LimitUnit::Day {
                return Err(invalid(
                    format!("{here}.unit"),
                    "rate limits use SECOND or MINUTE; DAY belongs in usage_limits",
                ));
            }
            check_threshold(limit.threshold, &here)?;
            if !seen.insert(limit.key()) {
                return Err(invalid(
                    here,
                    format!(
                        "duplicate rate limit {}/{}",
                        limit.kind.as_str(),
                        limit.unit.as_str()
                    ),
                ));
            }
        }
        for (j, limit) in model.usage_limits.iter().enumerate() {
            let here = format!("{at}.usage_limits[{j}]");
            if limit.unit != LimitUnit::Day {
                return Err(invalid(format!("{here}.unit"), "usage limits use DAY"));
            }
            check_threshold(limit.threshold, &here)?;
            if !seen.insert(limit.key()) {
                return Err(invalid(
                    here,
                    format!(
                        "duplicate usage limit {}/{}",
                        limit.kind.as_str(),
                        limit.unit.as_str()
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn check_threshold(threshold: u64, at: &str) -> Result<(), InvalidModels> {
    if threshold > MAX_THRESHOLD {
        return Err(invalid(
            format!("{at}.threshold"),
            format!("must be an integer in 0..={MAX_THRESHOLD}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::LimitType;

    fn rate(kind: LimitType, unit: LimitUnit, threshold: u64) -> RateLimit {
        RateLimit {
            kind,
            unit,
            threshold,
        }
    }

    #[test]
    fn accepts_one_limit_per_type_and_unit() {
        let models = vec![ModelAccess {
            slug: "acme/m".into(),
            rate_limits: vec![
                rate(LimitType::Request, LimitUnit::Second, 1),
                rate(LimitType::Request, LimitUnit::Minute, 3),
                rate(LimitType::Token, LimitUnit::Minute, 100),
            ],
            usage_limits: vec![UsageLimit {
                kind: LimitType::Token,
                unit: LimitUnit::Day,
                threshold: 0,
            }],
        }];
        assert_eq!(validate_models(&models, "models"), Ok(()));
    }

    #[test]
    fn refuses_duplicates_bad_units_and_huge_thresholds() {
        let mut model = ModelAccess {
            slug: "acme/m".into(),
            rate_limits: vec![
                rate(LimitType::Request, LimitUnit::Minute, 1),
                rate(LimitType::Request, LimitUnit::Minute, 2),
            ],
            usage_limits: vec![],
        };
        let err = validate_models(std::slice::from_ref(&model), "models").unwrap_err();
        assert_eq!(
            err.to_string(),
            "models[0].rate_limits[1]: duplicate rate limit REQUEST/MINUTE"
        );

        model.rate_limits = vec![rate(LimitType::Request, LimitUnit::Day, 1)];
        let err = validate_models(std::slice::from_ref(&model), "models").unwrap_err();
        assert_eq!(err.field, "models[0].rate_limits[0].unit");

        model.rate_limits = vec![rate(LimitType::Token, LimitUnit::Second, MAX_THRESHOLD + 1)];
        let err = validate_models(std::slice::from_ref(&model), "models").unwrap_err();
        assert_eq!(err.field, "models[0].rate_limits[0].threshold");

        let twice = vec![
            ModelAccess {
                slug: "acme/m".into(),
                rate_limits: vec![],
                usage_limits: vec![],
            };
            2
        ];
        let err = validate_models(&twice, "models").unwrap_err();
        assert_eq!(err.to_string(), "models[1].slug: duplicate slug 'acme/m'");
    }
}
