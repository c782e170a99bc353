//! Input parsed into types that can only hold valid values ("parse, don't validate").

mod email;
mod names;
mod username;

pub use email::Email;
pub use names::{LoginIdentifier, PersonName};
pub use username::Username;
