use std::collections::HashSet;

use futures_util::future::join_all;
use portcullis::api::pb::TokenInvalidReason;
use tonic::Code;

use crate::{
    harness::{Backend, reason, spawn_app},
    on_both_backends,
};

on_both_backends!(
    concurrent_logins_get_distinct_sessions,
    concurrent_refreshes_have_exactly_one_winner,
    logout_racing_validate_never_lets_a_revoked_session_through,
);

async fn concurrent_logins_get_distinct_sessions(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    app.register("uma").await;
    let logins = join_all((0..20).map(|_| app.login("uma"))).await;
    let sessions: HashSet<String> = logins.iter().map(|l| l.session.as_ref().unwrap().id.clone()).collect();
    let refresh: HashSet<String> =
        logins.iter().map(|l| l.tokens.as_ref().unwrap().refresh_token.clone()).collect();
    assert_eq!(sessions.len(), 20);
    assert_eq!(refresh.len(), 20);
    let access = &logins[0].tokens.as_ref().unwrap().access_token;
    assert_eq!(app.list_sessions(access).await.unwrap().len(), 20);
}

async fn concurrent_refreshes_have_exactly_one_winner(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    let (_, refresh, _) = app.user_session("victor").await;
    let results = join_all((0..50).map(|_| app.refresh(&refresh))).await;
    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "exactly one successor");
    for failure in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(failure.code(), Code::Unauthenticated, "{failure:?}");
    }
    // The one successor is the session's only live refresh token, and it works.
    let successor = winners[0].refresh_token.clone();
    app.refresh(&successor).await.expect("the successor refreshes");
}

async fn logout_racing_validate_never_lets_a_revoked_session_through(backend: Backend) {
    let Some(app) = spawn_app(backend).await else { return };
    for round in 0..5 {
        let (access, _, _) = app.user_session(&format!("wendy{round}")).await;
        let validators = join_all((0..20).map(|_| app.validate(&access)));
        let (_, logout) = tokio::join!(validators, app.logout(&access));
        logout.expect("logout");
        // Once logout has answered, no validation may succeed, on any connection.
        let after = join_all((0..20).map(|_| app.validate(&access))).await;
        for v in after {
            assert_eq!(reason(&v), TokenInvalidReason::SessionRevoked);
        }
    }
}
