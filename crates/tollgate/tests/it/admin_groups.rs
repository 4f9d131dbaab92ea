//! admin_groups
