//! admin_misc
