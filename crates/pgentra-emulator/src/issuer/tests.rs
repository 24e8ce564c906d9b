//! Tests of issuing and verifying, and of pgentra's reading of the emulator's tokens.

use super::*;
use aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256;
use pgentra::claims::UsernameSource;

const AUD: &str = "https://ossrdbms-aad.database.windows.net";
const SKEW: Duration = Duration::from_secs(5);

fn issuer() -> Issuer {
    Issuer::new(
        "72f988bf-0000-4000-8000-00000000e001",
        Duration::from_secs(3600),
    )
}

#[test]
fn tokens_verify_and_name_their_role_as_pgentra_derives_it() {
    let issuer = issuer();
    let cases = [
        (
            Principal::user("alice@contoso.com"),
            Ok(UsernameSource::Upn),
        ),
        (
            Principal::user_assigned_identity("orders-mi"),
            Ok(UsernameSource::UserAssignedIdentity),
        ),
        (
            Principal::system_assigned_identity(
                "/subscriptions/s/resourcegroups/g/providers/Microsoft.Web/sites/shop/slots/staging",
            ),
            Ok(UsernameSource::SystemAssignedIdentity),
        ),
        (Principal::service_principal("reporting-app"), Err(())),
        (
            Principal::guest(
                "bob_outlook.com#EXT#@contoso.onmicrosoft.com",
                "bob@outlook.com",
            ),
            Err(()),
        ),
    ];
    for (principal, expected) in cases {
        let issued = issuer.issue(&principal, &format!("{AUD}/.default"));
        let verified = issuer.verify(&issued.token, AUD, SKEW).unwrap();
        assert_eq!(verified.oid(), Some(principal.oid.as_str()));
        assert_eq!(verified.is_app(), principal.is_app());
        // The emulator's tokens and pgentra's reading of them agree.
        let claims = pgentra::claims::Claims::decode(&issued.token).unwrap();
        assert_eq!(claims.exp(), Some(issued.expires_on as i64));
        match (claims.role_name(), expected) {
            (Ok((role, source)), Ok(expected)) => {
                assert_eq!(role, principal.role);
                assert_eq!(source, expected);
            }
            (Err(_), Err(())) => {}
            (got, expected) => panic!("{}: got {got:?}, expected {expected:?}", principal.role),
        }
    }
    assert_eq!(
        Principal::system_assigned_identity(
            "/subscriptions/s/resourcegroups/g/providers/Microsoft.Web/sites/shop/slots/staging"
        )
        .role,
        "shop/slots/staging"
    );
}

#[test]
fn rejections() {
    let issuer = issuer();
    let alice = Principal::user("alice@contoso.com");
    let now = unix_seconds(SystemTime::now());
    let expired = issuer.issue_at(&alice, AUD, now - 7200);
    assert_eq!(
        issuer.verify(&expired.token, AUD, SKEW),
        Err(TokenRejection::Expired)
    );
    let future = issuer.issue_at(&alice, AUD, now + 600);
    assert_eq!(
        issuer.verify(&future.token, AUD, SKEW),
        Err(TokenRejection::NotYetValid)
    );
    let wrong_aud = issuer.issue(&alice, "https://management.azure.com/.default");
    assert!(matches!(
        issuer.verify(&wrong_aud.token, AUD, SKEW),
        Err(TokenRejection::WrongAudience { .. })
    ));
    let other = Issuer::new(issuer.tenant(), Duration::from_secs(3600));
    let forged = other.issue(&alice, AUD);
    assert_eq!(
        issuer.verify(&forged.token, AUD, SKEW),
        Err(TokenRejection::BadSignature)
    );
    let good = issuer.issue(&alice, AUD).token;
    let (head, _) = good.rsplit_once('.').unwrap();
    let tampered = format!("{head}.{}", URL_SAFE_NO_PAD.encode([0u8; 256]));
    assert_eq!(
        issuer.verify(&tampered, AUD, SKEW),
        Err(TokenRejection::BadSignature)
    );
    let other_issuer =
        issuer.sign(&json!({"iss": "https://login.example/other/", "aud": AUD, "exp": now + 60}));
    assert_eq!(
        issuer.verify(&other_issuer, AUD, SKEW),
        Err(TokenRejection::WrongIssuer)
    );
    for garbage in ["", "not a jwt", "a.b.c", "{\"eyJ\"}"] {
        assert!(
            matches!(
                issuer.verify(garbage, AUD, SKEW),
                Err(TokenRejection::Malformed(_))
            ),
            "{garbage}"
        );
    }
}

#[test]
fn another_tenants_tokens_are_signed_alike_but_refused() {
    let issuer = issuer();
    let other = "11111111-2222-3333-4444-555555555555";
    let eve = Principal::user("eve@fabrikam.com").in_tenant(other);
    let token = issuer.issue(&eve, AUD).token;
    assert_eq!(
        issuer.verify(&token, AUD, SKEW),
        Err(TokenRejection::WrongTenant {
            tenant: other.into()
        })
    );
    let claims = pgentra::claims::Claims::decode(&token).unwrap();
    assert_eq!(claims.tid(), Some(other));
}

#[test]
fn group_claims_grow_a_token_to_the_size_of_a_real_users() {
    let issuer = issuer();
    let alice = Principal::user("alice@contoso.com");
    let plain = issuer.issue(&alice, AUD).token;
    issuer.set_token_groups(150);
    let large = issuer.issue(&alice, AUD).token;
    assert!(plain.len() < 1500, "{}", plain.len());
    assert!((8_000..10_000).contains(&large.len()), "{}", large.len());
    let claims = pgentra::claims::Claims::decode(&large).unwrap();
    assert_eq!(claims.as_map()["groups"].as_array().unwrap().len(), 150);
    assert!(issuer.verify(&large, AUD, SKEW).is_ok());
}

#[test]
fn the_oracle_reads_tokens_with_its_own_code() {
    let issuer = issuer();
    let now = unix_seconds(SystemTime::now());
    // Claims pgentra's decoder and the server see alike, signed but broken.
    for (payload, expected) in [
        (
            json!({"iss": issuer.issuer(), "aud": [AUD, "x"], "exp": now + 60, "oid": "o"}),
            true,
        ),
        (
            json!({"iss": issuer.issuer(), "aud": AUD, "exp": now + 60}),
            false,
        ),
        (
            json!({"iss": issuer.issuer(), "aud": AUD, "exp": "soon", "oid": "o"}),
            false,
        ),
        (
            json!({"iss": issuer.issuer(), "exp": now + 60, "oid": "o"}),
            false,
        ),
    ] {
        let token = issuer.sign(&payload);
        assert_eq!(
            issuer.verify(&token, AUD, SKEW).is_ok(),
            expected,
            "{payload}"
        );
    }
}

#[test]
fn lifetime_is_configurable_from_seconds_to_hours() {
    let issuer = issuer();
    for lifetime in [
        Duration::from_secs(3),
        Duration::from_secs(20),
        Duration::from_secs(6 * 3600),
    ] {
        issuer.set_lifetime(lifetime);
        let now = unix_seconds(SystemTime::now());
        let issued = issuer.issue_at(&Principal::user("a@b"), AUD, now);
        assert_eq!(issued.expires_on - now, lifetime.as_secs());
    }
}

#[test]
fn jwks_publishes_the_verifying_key() {
    let issuer = issuer();
    let jwks = issuer.jwks();
    let key = &jwks["keys"][0];
    assert_eq!(key["kty"], "RSA");
    let n = URL_SAFE_NO_PAD.decode(key["n"].as_str().unwrap()).unwrap();
    let e = URL_SAFE_NO_PAD.decode(key["e"].as_str().unwrap()).unwrap();
    let token = issuer.issue(&Principal::user("a@b"), AUD).token;
    let (input, signature) = token.rsplit_once('.').unwrap();
    PublicKeyComponents { n, e }
        .verify(
            &RSA_PKCS1_2048_8192_SHA256,
            input.as_bytes(),
            &URL_SAFE_NO_PAD.decode(signature).unwrap(),
        )
        .unwrap();
}

#[test]
fn ids_are_stable_and_distinct() {
    assert_eq!(Principal::user("a@b").oid, Principal::user("a@b").oid);
    assert_ne!(Principal::user("a@b").oid, Principal::user("c@d").oid);
    assert_eq!(Principal::user("a@b").oid.len(), 36);
}
