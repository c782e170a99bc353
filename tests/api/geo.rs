//! IP geolocation from a City database the test builds itself.

use std::path::Path;

use portcullis::api::pb;
use serde::Serialize;

use crate::{
    harness::{Backend, PASSWORD, bearer, spawn_app_with, test_settings},
    on_both_backends,
};

on_both_backends!(logins_record_where_they_came_from);

/// A GeoLite2-City-shaped database: 203.0.113.0/24 is London; nothing else is known.
fn city_database(path: &Path, database_type: &str) {
    use maxminddb_writer::{Database, paths::IpAddrWithMask};
    #[derive(Serialize)]
    struct Names {
        en: &'static str,
    }
    #[derive(Serialize)]
    struct City {
        names: Names,
    }
    #[derive(Serialize)]
    struct Country {
        iso_code: &'static str,
    }
    #[derive(Serialize)]
    struct Coordinates {
        latitude: f64,
        longitude: f64,
    }
    #[derive(Serialize)]
    struct Record {
        city: City,
        country: Country,
        location: Coordinates,
    }
    let mut db = Database::default();
    db.metadata.database_type = database_type.into();
    db.metadata.languages = vec!["en".into()];
    db.metadata.binary_format_major_version = 2;
    let london = db
        .insert_value(Record {
            city: City { names: Names { en: "London" } },
            country: Country { iso_code: "GB" },
            location: Coordinates { latitude: 51.5142, longitude: -0.0931 },
        })
        .unwrap();
    db.insert_node(IpAddrWithMask::new("203.0.113.0".parse().unwrap(), 24), london);
    db.write_to(std::fs::File::create(path).unwrap()).unwrap();
}

async fn logins_record_where_they_came_from(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let mmdb = dir.path().join("city.mmdb");
    city_database(&mmdb, "GeoLite2-City");
    let Some(app) = spawn_app_with(backend, |s| s.tracking.geoip_database = Some(mmdb.clone())).await else {
        return;
    };
    app.register("lola").await;

    // From London (the harness's ClientContext says 203.0.113.7).
    let session = app.login("lola").await;
    let access = session.tokens.unwrap().access_token;
    let location = session.session.unwrap().location.expect("a located session");
    assert_eq!((location.country.as_str(), location.city.as_str()), ("GB", "London"));
    assert!((location.latitude.unwrap() - 51.5142).abs() < 1e-9);
    assert!((location.longitude.unwrap() + 0.0931).abs() < 1e-9);

    // From an address the database does not know.
    let mut client = app.auth.clone();
    let elsewhere = client
        .login(pb::LoginRequest {
            identifier: "lola".into(),
            password: PASSWORD.into(),
            client: Some(pb::ClientContext { ip_address: "198.51.100.1".into(), ..Default::default() }),
        })
        .await
        .unwrap()
        .into_inner();
    let Some(pb::login_response::Outcome::Authenticated(elsewhere)) = elsewhere.outcome else { panic!() };
    assert!(elsewhere.session.unwrap().location.is_none());

    let mut sessions = app.sessions.clone();
    let listed =
        sessions.list_sessions(bearer(pb::ListSessionsRequest {}, &access)).await.unwrap().into_inner();
    assert_eq!(listed.sessions.iter().filter(|s| s.location.is_some()).count(), 1);
    let history = sessions
        .list_login_history(bearer(pb::ListLoginHistoryRequest::default(), &access))
        .await
        .unwrap()
        .into_inner();
    let located: Vec<_> = history.attempts.iter().filter_map(|a| a.location.as_ref()).collect();
    assert_eq!(located.len(), 1, "the London login, not the other one");
    assert_eq!(located[0].city, "London");
}

#[tokio::test]
async fn a_database_of_another_kind_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mmdb = dir.path().join("asn.mmdb");
    city_database(&mmdb, "GeoLite2-ASN");
    let Some((mut settings, _data)) = test_settings(Backend::Embedded).await else { return };
    settings.tracking.geoip_database = Some(mmdb);
    let error = portcullis::startup::Application::build(settings).await.err().expect("refused");
    assert!(format!("{error:#}").contains("City database"), "{error:#}");
}
