//! Stored credentials: key files and AES-256-GCM ([`keys`]), plaintext that
//! redacts and zeroizes ([`secret`]), writing them ([`store`]), and the one
//! path that decrypts them for a launch ([`resolver`]).

pub mod keys;
pub mod resolver;
pub mod secret;
pub mod store;
