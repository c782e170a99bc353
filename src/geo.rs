//! IP geolocation from a MaxMind GeoIP2/GeoLite2 City database (`tracking.geoip_database`).
//! Without one, locations are simply absent. The file is read once at start-up; lookups are
//! in-memory and cheap.

use std::{net::IpAddr, path::Path};

use maxminddb::{Reader, geoip2};

use crate::store::Location;

pub struct GeoIp {
    reader: Reader<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    #[error("cannot read the GeoIP database {path}")]
    Open { path: String, source: maxminddb::MaxMindDbError },
    #[error("{path} is a {kind} database; a City database (GeoIP2-City or GeoLite2-City) is needed")]
    NotCity { path: String, kind: String },
}

impl GeoIp {
    pub fn open(path: &Path) -> Result<GeoIp, GeoError> {
        let shown = path.display().to_string();
        let reader =
            Reader::open_readfile(path).map_err(|source| GeoError::Open { path: shown.clone(), source })?;
        let kind = reader.metadata().database_type.clone();
        if !kind.contains("City") {
            return Err(GeoError::NotCity { path: shown, kind });
        }
        Ok(GeoIp { reader })
    }

    /// Where `ip` is, if the database knows. Private and unknown addresses have no location;
    /// a malformed record is treated the same (and logged), never an error for the caller.
    pub fn locate(&self, ip: IpAddr) -> Option<Location> {
        let found = self.reader.lookup(ip).and_then(|r| r.decode::<geoip2::City>());
        let city = match found {
            Ok(Some(city)) => city,
            Ok(None) => return None,
            Err(error) => {
                tracing::warn!(%ip, error = %error, "GeoIP lookup failed");
                return None;
            }
        };
        let location = Location {
            country: city.country.iso_code.unwrap_or_default().to_string(),
            city: city.city.names.english.unwrap_or_default().to_string(),
            latitude: city.location.latitude,
            longitude: city.location.longitude,
        };
        (location != Location::default()).then_some(location)
    }
}
