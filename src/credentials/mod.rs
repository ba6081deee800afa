//! Stored credentials: key files and AES-256-GCM ([`keys`]), plaintext that
//! redacts and zeroizes ([`secret`]), writing them ([`store`]), and the one
//! path that decrypts them for a launch ([`resolver`]); connector state,
//! kept the same way ([`state`]).

pub mod keys;
pub mod resolver;
pub mod secret;
pub mod state;
pub mod store;
