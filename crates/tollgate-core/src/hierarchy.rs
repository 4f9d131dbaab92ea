//! Limit resolution over a group tree — SPEC §1.3.
//!
//! A `chain` is always `[group, parent, ..., root]`. INDEPENDENT: for each (slug, type,
//! unit) the nearest declaration on the chain applies, counted on the group's own counter.
//! CASCADING: every declaration on the chain applies, each counted on the declaring
//! group's counter (so siblings share their ancestors' pools). In both modes a group may
//! call exactly the slugs in its own `models`.

use std::collections::BTreeMap;

use crate::group::{Group, ModelAccess, MAX_DEPTH};
use crate::limits::{LimitKey, LimitMode, LimitType, LimitUnit};

/// One limit that gates a group's calls on a slug.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveLimit {
    pub kind: LimitType,
    pub unit: LimitUnit,
    pub threshold: u64,
    /// The group whose declaration this is.
    pub source_group: String,
    /// The group whose counter the limit is enforced on: the caller's own group in
    /// INDEPENDENT mode, the declaring group in CASCADING mode.
    pub counter_group: String,
}

impl EffectiveLimit {
    pub fn is_rate(&self) -> bool {
        self.unit != LimitUnit::Day
    }
}

/// The effective limits of one slug of a group, as listed in `effective_models`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveModel {
    pub slug: String,
    pub limits: Vec<EffectiveLimit>,
}

/// Exactly one limit per (type, unit): the nearest declaration wins.
fn independent_limits(chain: &[Group], slug: &str) -> Vec<EffectiveLimit> {
    let Some(own) = chain.first() else {
        return Vec::new();
    };
    let mut nearest: BTreeMap<LimitKey, EffectiveLimit> = BTreeMap::new();
    let mut order: Vec<LimitKey> = Vec::new();
    for group in chain {
        let Some(model) = group.model(slug) else {
            continue;
        };
        for (key, threshold) in declared(model) {
            if nearest.contains_key(&key) {
                continue;
            }
            order.push(key);
            nearest.insert(
                key,
                EffectiveLimit {
                    kind: key.kind,
                    unit: key.unit,
                    threshold,
                    source_group: group.id.clone(),
                    counter_group: own.id.clone(),
                },
            );
        }
    }
    order
        .into_iter()
        .filter_map(|key| nearest.remove(&key))
        .collect()
}

/// Every declaration on the chain, own first, each on its declaring group's counter.
fn cascading_limits(chain: &[Group], slug: &str) -> Vec<EffectiveLimit> {
    let mut limits = Vec::new();
    for group in chain {
        let Some(model) = group.model(slug) else {
            continue;
        };
        for (key, threshold) in declared(model) {
            limits.push(EffectiveLimit {
                kind: key.kind,
                unit: key.unit,
                threshold,
                source_group: group.id.clone(),
                counter_group: group.id.clone(),
            });
        }
    }
    limits
}

fn declared(model: &ModelAccess) -> impl Iterator<Item = (LimitKey, u64)> + '_ {
    model
        .rate_limits
        .iter()
        .map(|l| (l.key(), l.threshold))
        .chain(model.usage_limits.iter().map(|l| (l.key(), l.threshold)))
}

/// The limits gating calls of `chain[0]` on `slug`, or `None` when the group may not call
/// the slug at all.
pub fn limits_for_slug(chain: &[Group], slug: &str) -> Option<Vec<EffectiveLimit>> {
    let own = chain.first()?;
    own.model(slug)?;
    Some(match own.mode {
        LimitMode::Independent => independent_limits(chain, slug),
        LimitMode::Cascading => cascading_limits(chain, slug),
    })
}

/// `effective_models` of `chain[0]`: one entry per slug of its own `models`.
pub fn effective_models(chain: &[Group]) -> Vec<EffectiveModel> {
    let Some(own) = chain.first() else {
        return Vec::new();
    };
    own.models
        .iter()
        .map(|m| EffectiveModel {
            slug: m.slug.clone(),
            limits: limits_for_slug(chain, &m.slug).unwrap_or_default(),
        })
        .collect()
}

/// A write-time rule of the tree broken by a create or a PATCH.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HierarchyError {
    #[error("Child group exceeds parent group limit.")]
    ExceedsParent,
    #[error("hierarchy.limit_enforcement: must match the parent group's mode ({parent})")]
    ModeMismatch { parent: &'static str },
    #[error("hierarchy.parent_group_id: the tree would be deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// Checks a new group against its parent: same mode, depth cap. `ancestors` is
/// `[parent, ..., root]`. Returns the new group's depth.
pub fn check_placement(mode: LimitMode, ancestors: &[Group]) -> Result<u32, HierarchyError> {
    let Some(parent) = ancestors.first() else {
        return Ok(1);
    };
    if parent.mode != mode {
        return Err(HierarchyError::ModeMismatch {
            parent: parent.mode.as_str(),
        });
    }
    let depth = parent.depth + 1;
    if depth > MAX_DEPTH {
        return Err(HierarchyError::TooDeep);
    }
    Ok(depth)
}

/// CASCADING write-time check: no declared threshold above an ancestor's declared
/// threshold for the same (slug, type, unit), and — for a PATCH — none below a
/// descendant's. INDEPENDENT trees have no bound; call this only for CASCADING.
pub fn check_cascading(
    models: &[ModelAccess],
    ancestors: &[Group],
    descendants: &[Group],
) -> Result<(), HierarchyError> {
    for model in models {
        for (key, threshold) in declared(model) {
            let above = ancestors
                .iter()
                .filter_map(|g| g.model(&model.slug))
                .flat_map(declared)
                .any(|(k, t)| k == key && threshold > t);
            let below = descendants
                .iter()
                .filter_map(|g| g.model(&model.slug))
                .flat_map(declared)
                .any(|(k, t)| k == key && t > threshold);
            if above || below {
                return Err(HierarchyError::ExceedsParent);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Timestamp;
    use crate::limits::{RateLimit, UsageLimit};

    fn group(id: &str, mode: LimitMode, depth: u32, models: Vec<ModelAccess>) -> Group {
        Group {
            id: id.into(),
            workspace_id: "ws".into(),
            name: None,
            external_entity_id: id.into(),
            models,
            mode,
            parent_id: None,
            depth,
            created_at: Timestamp(0),
        }
    }

    fn token_minute(slug: &str, threshold: u64) -> ModelAccess {
        ModelAccess {
            slug: slug.into(),
            rate_limits: vec![RateLimit {
                kind: LimitType::Token,
                unit: LimitUnit::Minute,
                threshold,
            }],
            usage_limits: vec![],
        }
    }

    fn bare(slug: &str) -> ModelAccess {
        ModelAccess {
            slug: slug.into(),
            rate_limits: vec![],
            usage_limits: vec![],
        }
    }

    /// SPEC §1.3 worked example: O declares TOKEN/MINUTE 100, F and E declare 70.
    #[test]
    fn worked_example_cascading_lists_own_and_parent_pools() {
        let o = group(
            "O",
            LimitMode::Cascading,
            1,
            vec![token_minute("acme/m", 100)],
        );
        let f = group(
            "F",
            LimitMode::Cascading,
            2,
            vec![token_minute("acme/m", 70)],
        );
        let limits = limits_for_slug(&[f, o], "acme/m").unwrap();
        assert_eq!(
            limits,
            vec![
                EffectiveLimit {
                    kind: LimitType::Token,
                    unit: LimitUnit::Minute,
                    threshold: 70,
                    source_group: "F".into(),
                    counter_group: "F".into(),
                },
                EffectiveLimit {
                    kind: LimitType::Token,
                    unit: LimitUnit::Minute,
                    threshold: 100,
                    source_group: "O".into(),
                    counter_group: "O".into(),
                },
            ]
        );
    }

    #[test]
    fn worked_example_independent_uses_own_declaration_on_own_counter() {
        let o = group(
            "O",
            LimitMode::Independent,
            1,
            vec![token_minute("acme/m", 100)],
        );
        let e = group(
            "E",
            LimitMode::Independent,
            2,
            vec![token_minute("acme/m", 70)],
        );
        let limits = limits_for_slug(&[e, o.clone()], "acme/m").unwrap();
        assert_eq!(limits.len(), 1);
        assert_eq!(limits[0].threshold, 70);
        assert_eq!(limits[0].source_group, "E");
        assert_eq!(limits[0].counter_group, "E");

        let own = limits_for_slug(&[o], "acme/m").unwrap();
        assert_eq!(own[0].threshold, 100);
        assert_eq!(own[0].counter_group, "O");
    }

    #[test]
    fn independent_inherits_nearest_and_counts_on_own_counter() {
        let root = group(
            "R",
            LimitMode::Independent,
            1,
            vec![token_minute("acme/m", 100)],
        );
        let mid = group("M", LimitMode::Independent, 2, vec![bare("acme/m")]);
        let leaf = group("L", LimitMode::Independent, 3, vec![bare("acme/m")]);
        let limits = limits_for_slug(&[leaf, mid, root], "acme/m").unwrap();
        assert_eq!(limits.len(), 1);
        assert_eq!(limits[0].threshold, 100);
        assert_eq!(limits[0].source_group, "R");
        assert_eq!(limits[0].counter_group, "L");
    }

    #[test]
    fn a_slug_outside_own_models_is_not_callable() {
        let root = group(
            "R",
            LimitMode::Cascading,
            1,
            vec![bare("acme/m"), bare("acme/x")],
        );
        let child = group("C", LimitMode::Cascading, 2, vec![bare("acme/m")]);
        assert_eq!(
            limits_for_slug(&[child.clone(), root.clone()], "acme/x"),
            None
        );
        assert_eq!(limits_for_slug(&[child, root], "acme/m"), Some(vec![]));
    }

    #[test]
    fn limits_are_per_slug() {
        let root = group(
            "R",
            LimitMode::Cascading,
            1,
            vec![token_minute("acme/m", 100), bare("acme/x")],
        );
        assert_eq!(limits_for_slug(&[root], "acme/x"), Some(vec![]));
    }

    #[test]
    fn cascading_check_refuses_child_above_ancestor_at_any_depth() {
        let root = group(
            "R",
            LimitMode::Cascading,
            1,
            vec![token_minute("acme/m", 60)],
        );
        let mid = group("M", LimitMode::Cascading, 2, vec![bare("acme/m")]);
        let err = check_cascading(
            &[token_minute("acme/m", 600)],
            &[mid.clone(), root.clone()],
            &[],
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "Child group exceeds parent group limit.");
        assert_eq!(
            check_cascading(&[token_minute("acme/m", 60)], &[mid, root], &[]),
            Ok(())
        );
    }

    #[test]
    fn cascading_check_refuses_parent_lowered_below_child() {
        let child = group(
            "C",
            LimitMode::Cascading,
            2,
            vec![token_minute("acme/m", 70)],
        );
        assert_eq!(
            check_cascading(
                &[token_minute("acme/m", 50)],
                &[],
                std::slice::from_ref(&child)
            ),
            Err(HierarchyError::ExceedsParent)
        );
        assert_eq!(
            check_cascading(&[token_minute("acme/m", 70)], &[], &[child]),
            Ok(())
        );
    }

    #[test]
    fn cascading_check_compares_same_type_and_unit_only() {
        let root = group(
            "R",
            LimitMode::Cascading,
            1,
            vec![ModelAccess {
                slug: "acme/m".into(),
                rate_limits: vec![],
                usage_limits: vec![UsageLimit {
                    kind: LimitType::Token,
                    unit: LimitUnit::Day,
                    threshold: 10,
                }],
            }],
        );
        assert_eq!(
            check_cascading(&[token_minute("acme/m", 600)], &[root], &[]),
            Ok(())
        );
    }

    #[test]
    fn placement_caps_depth_at_five_and_matches_mode() {
        let level5 = group("L5", LimitMode::Cascading, 5, vec![]);
        assert_eq!(
            check_placement(LimitMode::Cascading, std::slice::from_ref(&level5)),
            Err(HierarchyError::TooDeep)
        );
        let level4 = group("L4", LimitMode::Cascading, 4, vec![]);
        assert_eq!(
            check_placement(LimitMode::Cascading, std::slice::from_ref(&level4)),
            Ok(5)
        );
        assert_eq!(
            check_placement(LimitMode::Independent, &[level4]),
            Err(HierarchyError::ModeMismatch {
                parent: "CASCADING"
            })
        );
        assert_eq!(check_placement(LimitMode::Independent, &[]), Ok(1));
    }
}
