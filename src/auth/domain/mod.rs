//! Input parsed into types that can only hold valid values ("parse, don't validate").

mod email;
mod names;
mod profile;
mod username;

pub use email::Email;
pub use names::{LoginIdentifier, PersonName};
pub use profile::{Bio, Phone};
pub use username::Username;
