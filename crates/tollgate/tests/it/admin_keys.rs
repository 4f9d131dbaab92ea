//! admin_keys
