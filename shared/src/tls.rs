//! TLS for every client in the process (Postgres, Redis, the MAX API, the OTLP exporter): rustls
//! with the ring provider, the one fred and sqlx are built with, and the platform's roots (for a
//! private CA: `sslrootcert` in DATABASE_URL, or `SSL_CERT_FILE` for every client).

/// Installs ring as the process's rustls provider. Call before any client is built; a second
/// call does nothing.
pub fn init() {
    // Err only means a provider is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
