//! admin_endpoints
