//! Passwords: hashing ([`hasher`]) and the policy new passwords must meet ([`policy`]).

pub mod hasher;
pub mod policy;

pub use hasher::{HashError, PasswordHasher, Verified};
pub use policy::{NewPassword, PasswordPolicy, PolicyViolation};
