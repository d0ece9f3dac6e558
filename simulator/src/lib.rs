//! The destination simulator: fake MX servers and the DNS that points at them.
